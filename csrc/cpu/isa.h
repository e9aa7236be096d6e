// Which instruction sets the CPU kernels are compiled for, and which one runs (chosen once, at run time).
//
// A wheel must run on any x86-64 CPU, so the build passes no -march flag. Each kernel file with SIMD
// loops is compiled once per instruction set instead (foreach_isa.h), each copy in its own namespace
// and under `#pragma GCC target`; the entry points call the copy of active_isa() (SK_ISA_FN):
//   baseline  x86-64 (SSE2), or any other CPU: one-lane Simd (simd.h), the compiler may vectorise
//   avx2      x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE): the 256-bit Simd
//   avx512    x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) + PREFETCHW: the same 256-bit kernels (what
//             -march=native built on AVX-512 machines before), compiled for AVX-512; wider kernels
//             are a change to measure on such a machine first
// Only code written inside a target region is compiled for that ISA: headers included before it (the
// standard library, ATen, our shared helpers) stay baseline, so no weak symbol of a header function is
// compiled with AVX in one object and picked by the linker for all (tests/test_cpu_isa.py checks the
// built library).
//
// SPARSEKERN_CPU_ISA=baseline|avx2|avx512 forces one (an error if this CPU lacks it). A developer build
// with SPARSEKERN_NATIVE_ARCH=1 (-march=native) or a compiler other than GCC >= 12 on x86-64 compiles
// one copy ("baseline", with the best Simd that its compile flags allow).
#pragma once

#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(SPARSEKERN_NATIVE_ARCH)
#define SK_ISA_DISPATCH 1
#else
#define SK_ISA_DISPATCH 0
#endif

// Target of each ISA's region (GCC's `target` pragma syntax). x86-64-v3 does not promise PREFETCHW
// (Haswell does not advertise it), so the AVX2 copy's write prefetches are plain prefetcht0.
#define SK_TARGET_AVX2 "arch=x86-64-v3"
#define SK_TARGET_AVX512 "arch=x86-64-v4,prfchw,prefer-vector-width=256"

#define SK_PRAGMA(x) _Pragma(#x)
#define SK_PRAGMA_TARGET(t) SK_PRAGMA(GCC target(t))
#define SK_TARGET_BEGIN(t) _Pragma("GCC push_options") SK_PRAGMA_TARGET(t)
#define SK_TARGET_END _Pragma("GCC pop_options")

// SK_PER_ISA(declaration): declare it in each ISA's namespace, under that ISA's target (GCC takes a
// function's target from its first declaration). SK_ISA_FN(name) is the pointer to the active ISA's
// `name` (a function or a template specialisation: SK_ISA_FN(decode_forward<scalar_t>)(args...)).
#if SK_ISA_DISPATCH
#define SK_PER_ISA(...)                                                          \
  namespace isa_baseline { __VA_ARGS__; }                                        \
  SK_TARGET_BEGIN(SK_TARGET_AVX2) namespace isa_avx2 { __VA_ARGS__; } SK_TARGET_END \
  SK_TARGET_BEGIN(SK_TARGET_AVX512) namespace isa_avx512 { __VA_ARGS__; } SK_TARGET_END
#define SK_ISA_FN(...) \
  ::sparsekern::isa_pick(&isa_baseline::__VA_ARGS__, &isa_avx2::__VA_ARGS__, &isa_avx512::__VA_ARGS__)
#else
#define SK_PER_ISA(...) namespace isa_baseline { __VA_ARGS__; }
#define SK_ISA_FN(...) (&isa_baseline::__VA_ARGS__)
#endif

namespace sparsekern {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
bool isa_compiled(Isa isa);   // this build has a copy of the kernels for it
bool cpu_supports(Isa isa);   // this CPU (and OS) can run it
// The ISA the kernels run with: SPARSEKERN_CPU_ISA if set (checked on first use), else the best one
// compiled and supported. Chosen once; set_active_isa changes it (tests, benchmarks).
Isa active_isa();
// Selects `name` ("baseline", "avx2", "avx512" or "auto"), TORCH_CHECKed; returns the previous name.
std::string set_active_isa(const std::string& name);

std::vector<std::string> compiled_isas();      // names of the ISAs this build has kernels for
std::vector<std::string> supported_isas();     // names of the ISAs this CPU can run
std::vector<std::string> baseline_features();  // ISA macros the objects outside the ISA regions had

// What was compiled and what runs (sparsekern._C.build_info()).
struct BuildInfo {
  std::string isa;                             // active_isa()
  std::vector<std::string> compiled;           // ISAs with a copy of the kernels
  std::vector<std::string> supported;          // ISAs this CPU can run (among those known)
  std::vector<std::string> baseline_features;  // ISA macros the baseline objects were compiled with
  bool dispatch;                               // run-time dispatch (SK_ISA_DISPATCH)
  bool native_arch;                            // built with SPARSEKERN_NATIVE_ARCH (-march=native)
  std::string cxx_flags;                       // compile flags the build passed (SPARSEKERN_CXX_FLAGS_HEX)
  std::string compiler;
  std::vector<std::pair<std::string, std::string>> targets;  // ISA -> GCC target of its copy
};
BuildInfo build_info();

template <typename F>
inline F isa_pick(F baseline, F avx2, F avx512) {
  switch (active_isa()) {
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    default: return baseline;
  }
}

}  // namespace sparsekern
