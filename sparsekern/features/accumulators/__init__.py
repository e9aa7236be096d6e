"""The mergeable parts of :class:`sparsekern.features.FeatureStats`, one idea per file.

- ``config``: :class:`FeatureStatsConfig` (what fixes a state's layout; states merge iff equal);
- ``batch``: :class:`FiringBatch` (one checked batch of a code, as every accumulator reads it);
- ``base``: :class:`Accumulator` (the contract: ``update``, ``merge``, ``state_dict``, ``from_state_dict``,
  written once on a declared :class:`Field` layout);
- ``moments``: :class:`MomentsAccumulator` (per-feature counts, sums, max/min, histograms);
- ``pair_table``: :class:`PairTableAccumulator` (exact co-occurrence counts, dense or on a subset);
- ``partner_sketch``: :class:`PartnerSketchAccumulator` (each feature's heaviest partners, bounded memory);
- ``conditioned``: :class:`ConditionedAccumulator` (statistics of another activation given each feature).
"""

from .base import Accumulator, Field
from .batch import FiringBatch
from .conditioned import ConditionedAccumulator
from .config import FeatureStatsConfig
from .moments import MomentsAccumulator
from .pair_table import PairTableAccumulator, PartnerCounts
from .partner_sketch import PartnerSketchAccumulator

__all__ = [
    "Accumulator", "ConditionedAccumulator", "FeatureStatsConfig", "Field", "FiringBatch",
    "MomentsAccumulator", "PairTableAccumulator", "PartnerCounts", "PartnerSketchAccumulator",
]
