"""Deprecated alias of :mod:`sparsekern.backends` (the same module object, so patches reach it)."""

import sys

from . import backends

sys.modules[__name__] = backends
