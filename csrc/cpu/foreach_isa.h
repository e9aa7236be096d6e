// Compiles the per-ISA part of a kernel file once per instruction set (see isa.h). A kernel file reads
//
//   #ifndef SK_ISA
//   ... includes, shared types, entry points (compiled once; they call SK_ISA_FN(kernel)) ...
//   #define SK_ISA_FILE "this_file.cpp"
//   #include "foreach_isa.h"
//   #else
//   SK_ISA_BEGIN  // namespace sparsekern::SK_ISA, compiled for that ISA
//   using simd::SK_ISA_SIMD::Simd;
//   ... kernels ...
//   SK_ISA_END
//   #endif
//
// This header includes the file again once per ISA with SK_ISA set to the ISA's namespace (isa_baseline,
// isa_avx2, isa_avx512) and SK_ISA_SIMD to the simd.h layer it uses, so the kernels see every declaration
// of the once-compiled part above them. No include guard: each kernel file includes it once.
#ifndef SK_ISA_FILE
#error "define SK_ISA_FILE (the including file's name) before including foreach_isa.h"
#endif
#ifdef SK_ISA
#error "foreach_isa.h included from a per-ISA pass"
#endif

#define SK_ISA isa_baseline
#if SK_ISA_DISPATCH || !SK_HAVE_AVX2_SIMD
#define SK_ISA_SIMD scalar
#else
#define SK_ISA_SIMD avx2  // a single copy built with -march=native (or -mavx2 -mfma -mf16c)
#endif
#define SK_ISA_BEGIN namespace sparsekern { namespace isa_baseline {
#define SK_ISA_END }}
#include SK_ISA_FILE
#undef SK_ISA
#undef SK_ISA_SIMD
#undef SK_ISA_BEGIN
#undef SK_ISA_END

#if SK_ISA_DISPATCH
#define SK_ISA isa_avx2
#define SK_ISA_SIMD avx2
#define SK_ISA_BEGIN SK_TARGET_BEGIN(SK_TARGET_AVX2) namespace sparsekern { namespace isa_avx2 {
#define SK_ISA_END }} SK_TARGET_END
#include SK_ISA_FILE
#undef SK_ISA
#undef SK_ISA_SIMD
#undef SK_ISA_BEGIN
#undef SK_ISA_END

#define SK_ISA isa_avx512
#define SK_ISA_SIMD avx2  // 256-bit vectors on AVX-512 too (isa.h)
#define SK_ISA_BEGIN SK_TARGET_BEGIN(SK_TARGET_AVX512) namespace sparsekern { namespace isa_avx512 {
#define SK_ISA_END }} SK_TARGET_END
#include SK_ISA_FILE
#undef SK_ISA
#undef SK_ISA_SIMD
#undef SK_ISA_BEGIN
#undef SK_ISA_END
#endif

#undef SK_ISA_FILE
