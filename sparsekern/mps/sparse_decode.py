"""Metal sparse_decode forward: out[n, c] = bias[c] + sum_j values[n, j] * W[indices[n, j], c].

One thread per output element (grid [d, N]); adjacent threads read adjacent columns of the same
gathered W row, the row's (index, value) pairs are shared by the threadgroup's cache. Accumulates
in float32 for float32/float16/bfloat16 (MPS has no float64). Backward stays on the reference.
Written for ``torch.mps.compile_shader`` (torch >= 2.6); never run on Apple hardware so far.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

# Scalars arrive as 64-bit ints (compile_shader passes Python ints as int64 constants); tensor
# arguments bind to buffers in argument order.
_SOURCE = r"""
#include <metal_stdlib>
using namespace metal;

#define SK_SPARSE_DECODE(NAME, T)                                                   \
kernel void NAME(device const float* values [[buffer(0)]],                          \
                 device const long* indices [[buffer(1)]],                          \
                 device const T* W [[buffer(2)]],                                   \
                 device const float* bias [[buffer(3)]],                            \
                 device T* out [[buffer(4)]],                                       \
                 constant long& n_rows [[buffer(5)]],                               \
                 constant long& k [[buffer(6)]],                                    \
                 constant long& d [[buffer(7)]],                                    \
                 uint2 pos [[thread_position_in_grid]]) {                           \
  const long c = long(pos.x);                                                       \
  const long n = long(pos.y);                                                       \
  if (c >= d || n >= n_rows) return;  /* guards a rounded-up grid */                 \
  float acc = bias[c];                                                              \
  const device float* v = values + n * k;                                           \
  const device long* ix = indices + n * k;                                          \
  for (long j = 0; j < k; ++j) acc += v[j] * float(W[ix[j] * d + c]);               \
  out[n * d + c] = T(acc);                                                          \
}

SK_SPARSE_DECODE(sparse_decode_float, float)
SK_SPARSE_DECODE(sparse_decode_half, half)
#if __METAL_VERSION__ >= 310
SK_SPARSE_DECODE(sparse_decode_bfloat, bfloat)
#endif
"""

_KERNELS = {torch.float32: "sparse_decode_float", torch.float16: "sparse_decode_half",
            torch.bfloat16: "sparse_decode_bfloat"}


def metal_available() -> bool:
    """MPS is usable and this torch can compile Metal shaders at run time."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available() and hasattr(torch.mps, "compile_shader"))


@functools.lru_cache(maxsize=1)
def _library():
    return torch.mps.compile_shader(_SOURCE)


def sparse_decode_metal(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor]) -> Tensor:
    """values/indices [N, k] (indices validated in [0, d_sae)), W_dec [d_sae, d] on MPS -> [N, d]."""
    if not metal_available():
        raise RuntimeError("sparse_decode_metal: MPS with torch.mps.compile_shader is not available")
    kernel_name = _KERNELS.get(W_dec.dtype)
    if kernel_name is None or values.device.type != "mps":
        raise TypeError(f"sparse_decode_metal: MPS float32/float16/bfloat16 tensors only, got "
                        f"{W_dec.dtype} on {values.device}")
    kernel = getattr(_library(), kernel_name, None)
    if kernel is None:  # bfloat needs Metal 3.1 (macOS 14): fall back to the reference
        from ..ref import sparse_decode

        return sparse_decode(values, indices, W_dec, b_dec)
    n, k = values.shape
    d = W_dec.shape[1]
    W = W_dec.contiguous()  # dense rows: element (f, c) at f * d + c
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    if n == 0 or d == 0:
        return out
    bias = b_dec.float().contiguous() if b_dec is not None else torch.zeros(d, device=W.device)
    kernel(values.float().contiguous(), indices.long().contiguous(), W, bias, out, n, k, d, threads=[d, n])
    return out
