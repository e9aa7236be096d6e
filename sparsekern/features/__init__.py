"""Feature-level research helpers built on the sparse ops (one file per capability).

- ``top_examples``: :func:`top_activating_examples` (streaming per-feature top-k with locations);
- ``stats``: :class:`FeatureStats` / :func:`feature_stats` (counts, log sparsity, histograms and
  quantiles, co-occurrence, statistics of another activation conditioned on each feature);
- ``geometry``: :func:`decoder_neighbours`, :func:`encoder_decoder_neighbours`,
  :func:`cosine_neighbours`, :func:`feature_logits` (top-k without a ``d_sae x d_sae`` matrix);
- ``accumulators``: the mergeable parts of ``FeatureStats`` (moments, co-occurrence, conditioned);
- ``metrics``: :func:`reconstruction_metrics` (SAELens's eval metrics in one pass) and
  :func:`reconstruction_sums` / :class:`ReconstructionSums` (its mergeable sums: merge, all-reduce, finish).

Feature ablation sweeps live with the patching engine: ``sparsekern.patching.feature_ablation``.
"""

from .geometry import (
    FeatureLogits,
    Neighbours,
    cosine_neighbours,
    decoder_neighbours,
    encoder_decoder_neighbours,
    feature_logits,
)
from .metrics import ReconstructionMetrics, ReconstructionSums, reconstruction_metrics, reconstruction_sums
from .stats import FeatureStats, FeatureStatsConfig, PartnerCounts, feature_stats, sae_fingerprint
from .top_examples import top_activating_examples

__all__ = [
    "FeatureLogits", "FeatureStats", "FeatureStatsConfig", "Neighbours", "PartnerCounts",
    "ReconstructionMetrics", "ReconstructionSums", "cosine_neighbours", "decoder_neighbours",
    "encoder_decoder_neighbours", "feature_logits", "feature_stats", "reconstruction_metrics",
    "reconstruction_sums", "sae_fingerprint", "top_activating_examples",
]
