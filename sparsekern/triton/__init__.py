"""Triton backend (imported lazily by the op files, never by ``import sparsekern``).

Kernels:
  ``encode``  topk_encode / threshold_encode: strategies "blocks" (cuBLAS blocks + ``_select``),
              "fused" (``_fused``: GEMM + selection epilogue) and "tiles" (``encode_tiles``)
  ``decode``  sparse_decode forward, backward values (sparse-output matmul), backward weight
              (sorted indices + segmented reduction, no atomics)

On CUDA the kernels are compiled; with ``TRITON_INTERPRET=1`` (set before triton is imported) they
run on CPU tensors through Triton's interpreter, which is how CI checks them without a GPU.
``CALLS`` counts launches per op so tests can verify the public ops really dispatched here.
"""

from collections import Counter

CALLS: Counter = Counter()
