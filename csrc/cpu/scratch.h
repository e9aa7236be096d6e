// Memory the CPU kernels reuse or allocate: per-thread scratch that survives calls, and large fresh
// outputs backed by transparent huge pages. Baseline code (no SIMD), shared by every ISA's kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Internal to the extension (as the anonymous namespaces they replace): direct calls, no PLT.
#pragma GCC visibility push(hidden)
namespace sparsekern {

// Per-thread scratch of at least n elements that survives calls (OpenMP threads persist): no page
// faults per call. 64-byte aligned, so that accumulator rows (whole cache lines) never split a line.
// One buffer per thread and element type, shared by every kernel (each uses it within one call).
template <typename A>
inline A* thread_scratch(int64_t n) {
  constexpr int64_t kPad = 64 / sizeof(A);
  thread_local std::vector<A> buf;
  if (int64_t(buf.size()) < n + kPad) buf.resize(n + kPad);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<A*>((p + 63) & ~uintptr_t(63));
}

// Large fresh outputs (the [d_sae, d] weight grad) are first written by us; on Linux ask for
// transparent huge pages on their 2 MiB-aligned interior before that first touch: with 4 KiB
// pages the page faults of a fresh 75 MiB output cost ~30 ms on the VMs this was tuned on, ~4x
// the kernel itself (THP "madvise" mode is a common default; this is what torch's own
// THP_MEM_ALLOC_ENABLE does). Only memory this call allocated is advised; smaller outputs are
// left alone (no clear gain measured). SPARSEKERN_NO_THP=1 turns it off.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(sizes, opt.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* e = std::getenv("SPARSEKERN_NO_THP");
    return !(e && e[0] == '1');
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (enabled && t.nbytes() >= 16 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t a = (p + kHuge - 1) / kHuge * kHuge, b = (p + t.nbytes()) / kHuge * kHuge;
    if (b > a) (void)madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // advisory only
  }
#endif
  return t;
}

}  // namespace sparsekern
#pragma GCC visibility pop
