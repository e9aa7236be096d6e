"""sparsekern: sparse SAE / transcoder kernels for mechanistic interpretability.

``import sparsekern`` never fails because a backend is missing: without the compiled extension
every op runs the pure-PyTorch reference (a warning says so once).
"""

from . import ops
from ._backend import backends, forced_backend, use_backend
from .sparse_acts import SparseActs

__version__ = "0.1.0"

__all__ = ["SparseActs", "backends", "forced_backend", "ops", "use_backend", "__version__"]

# import the native extension now so a missing build is reported once, at import
from ._backend import native as _native  # noqa: E402

_native()
