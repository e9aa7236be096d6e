// Run-time choice of the kernels' instruction set (see isa.h), and what the build compiled.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

#define SK_STR2(...) #__VA_ARGS__
#define SK_STR(...) SK_STR2(__VA_ARGS__)

namespace sparsekern {
namespace {

constexpr Isa kAll[] = {Isa::baseline, Isa::avx2, Isa::avx512};

std::atomic<int> g_isa{-1};  // -1: not chosen yet
std::mutex g_isa_mutex;

Isa best_isa() {
  Isa best = Isa::baseline;
  for (Isa i : kAll)
    if (isa_compiled(i) && cpu_supports(i)) best = i;
  return best;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// name -> ISA, checked against the build and this CPU. `origin` names the setting in errors.
Isa parse_isa(const std::string& name, const char* origin) {
  if (name.empty() || name == "auto") return best_isa();
  for (Isa i : kAll) {
    if (name != isa_name(i)) continue;
    TORCH_CHECK(isa_compiled(i), origin, "=", name, ": this build has no ", name,
                " kernels (compiled: ", joined(compiled_isas()), ")");
    TORCH_CHECK(cpu_supports(i), origin, "=", name, ": this CPU cannot run ", name,
                " kernels (it supports: ", joined(supported_isas()), ")");
    return i;
  }
  TORCH_CHECK(false, origin, "=", name,
              " is not an instruction set; expected auto, baseline, avx2 or avx512");
  return Isa::baseline;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    default: return "baseline";
  }
}

bool isa_compiled(Isa isa) { return isa == Isa::baseline || SK_ISA_DISPATCH; }

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx2: return __builtin_cpu_supports("x86-64-v3");  // checks the OS saves YMM state too
    case Isa::avx512: return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("prfchw");
    default: return true;
  }
#else
  return isa == Isa::baseline;  // only the baseline copy is compiled (isa.h)
#endif
}

Isa active_isa() {
  int v = g_isa.load(std::memory_order_acquire);
  if (v >= 0) return static_cast<Isa>(v);
  std::lock_guard<std::mutex> lock(g_isa_mutex);
  v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("SPARSEKERN_CPU_ISA");
    v = static_cast<int>(parse_isa(env ? env : "", "SPARSEKERN_CPU_ISA"));
    g_isa.store(v, std::memory_order_release);
  }
  return static_cast<Isa>(v);
}

std::string set_active_isa(const std::string& name) {
  const Isa want = parse_isa(name, "set_cpu_isa");
  const std::string before = isa_name(active_isa());
  g_isa.store(static_cast<int>(want), std::memory_order_release);
  return before;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa i : kAll)
    if (isa_compiled(i)) out.emplace_back(isa_name(i));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa i : kAll)
    if (cpu_supports(i)) out.emplace_back(isa_name(i));
  return out;
}

std::vector<std::string> baseline_features() {
  // this file is compiled with the flags of every object outside the ISA regions
  std::vector<std::string> f;
#ifdef __SSE4_2__
  f.emplace_back("sse4.2");
#endif
#ifdef __AVX__
  f.emplace_back("avx");
#endif
#ifdef __AVX2__
  f.emplace_back("avx2");
#endif
#ifdef __FMA__
  f.emplace_back("fma");
#endif
#ifdef __F16C__
  f.emplace_back("f16c");
#endif
#ifdef __AVX512F__
  f.emplace_back("avx512f");
#endif
#ifdef __ARM_NEON
  f.emplace_back("neon");
#endif
  return f;
}

BuildInfo build_info() {
  BuildInfo b;
  b.isa = isa_name(active_isa());
  b.compiled = compiled_isas();
  b.supported = supported_isas();
  b.baseline_features = baseline_features();
  b.dispatch = SK_ISA_DISPATCH;
#ifdef SPARSEKERN_NATIVE_ARCH
  b.native_arch = true;
#else
  b.native_arch = false;
#endif
#ifdef SPARSEKERN_CXX_FLAGS_HEX
  // The build passes its flags hex-encoded: a single preprocessing number, which survives every
  // command-line quoting and is never macro-expanded (a word like `errno` in the flags would be).
  const std::string hex = SK_STR(SPARSEKERN_CXX_FLAGS_HEX);
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    b.cxx_flags += char(std::stoi(hex.substr(i, 2), nullptr, 16));
#endif
#if defined(__VERSION__)
  b.compiler = __VERSION__;
#endif
#if SK_ISA_DISPATCH
  b.targets = {{"avx2", SK_TARGET_AVX2}, {"avx512", SK_TARGET_AVX512}};
#endif
  return b;
}

}  // namespace sparsekern
