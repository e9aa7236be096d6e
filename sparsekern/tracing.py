"""Whether a tensor has data a value check can read (shared by the ops and ``SparseActs``)."""

from torch import Tensor, compiler
from torch._subclasses.fake_tensor import is_fake


def has_data(t: Tensor) -> bool:
    """False for meta tensors and while tracing (torch.compile/export, fake tensors).

    Value checks need a host sync on data that does not exist then; the custom-op bodies, which
    run on real tensors even in a compiled graph, do them instead.
    """
    return not (compiler.is_compiling() or t.is_meta or is_fake(t))
