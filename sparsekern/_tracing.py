"""Deprecated alias of :mod:`sparsekern.tracing` (the same module object, so patches reach it)."""

import sys

from . import tracing

sys.modules[__name__] = tracing
