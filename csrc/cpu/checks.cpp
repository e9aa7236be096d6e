// The index scan of checked_indices (checks.h), compiled per ISA: it reads every index once before
// a kernel reads any, so at small d it is a visible part of a decode call.
#ifndef SK_ISA
#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "simd.h"

#define SK_ISA_FILE "checks.cpp"
#include "foreach_isa.h"
#else
SK_ISA_BEGIN

void index_bounds(const int64_t* p, int64_t n, int64_t* lo, int64_t* hi) {
  int64_t l = p[0], h = p[0];
  for (int64_t i = 1; i < n; ++i) {  // branch-free min/max: vectorizes
    l = std::min(l, p[i]);
    h = std::max(h, p[i]);
  }
  *lo = l;
  *hi = h;
}

SK_ISA_END
#endif
