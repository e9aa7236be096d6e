"""Metal (Apple GPU) kernels, compiled at first use with ``torch.mps.compile_shader``.

Nothing here runs unless MPS is available and this torch has ``torch.mps.compile_shader``
(``metal_available()``); otherwise MPS tensors use the pure-PyTorch reference. None of it has
been run on Apple hardware yet (see docs/ops.md, "Apple silicon (MPS)").
"""

from .sparse_decode import metal_available, sparse_decode_metal

__all__ = ["metal_available", "sparse_decode_metal"]
