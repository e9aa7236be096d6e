"""Deprecated alias of :mod:`sparsekern.constants` (the same module object, so patches reach it)."""

import sys

from . import constants

sys.modules[__name__] = constants
