"""Deprecated alias of :mod:`sparsekern.registry` (the same module object, so patches reach it)."""

import sys

from . import registry

sys.modules[__name__] = registry
