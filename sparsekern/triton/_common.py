"""Small host-side helpers shared by the Triton kernels."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton.language as tl


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 accumulates in float64, everything else in float32 (as the references)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def store_dtype(t: torch.Tensor) -> torch.dtype:
    """dtype the kernels write for a ``t.dtype`` output. Triton's interpreter truncates fp32 ->
    bf16 (compiled kernels round to nearest even), so off CUDA bf16 outputs are written in fp32
    and rounded by torch."""
    return torch.float32 if t.device.type != "cuda" and t.dtype == torch.bfloat16 else t.dtype


def on_first_tensor_device(fn):
    """Launch on the device of the first tensor argument (Triton launches on the current CUDA
    device, which need not be the tensors' one)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)

    return wrapper


def feature_segments(indices, d_sae: int):
    """``(perm, bounds)``: ``perm`` orders the flat slots of ``indices [N, K]`` by feature (stable);
    ``bounds[f] .. bounds[f+1]`` is feature f's segment of that order (no host sync needed)."""
    flat_sorted, perm = torch.sort(indices.reshape(-1), stable=True)
    return perm, torch.searchsorted(flat_sorted, torch.arange(d_sae + 1, device=indices.device))
