import torch

# elements per temporary block (~64 MiB of fp32): bounds the reference's extra memory
BLOCK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(n_rows: int, row_elems: int):
    """Yield (start, stop) row ranges whose temporaries hold about BLOCK_ELEMS elements."""
    step = max(1, BLOCK_ELEMS // max(1, row_elems))
    for start in range(0, n_rows, step):
        yield start, min(n_rows, start + step)
