"""sparsekern on ``torch.distributed`` (launched with ``torchrun``; NCCL on GPUs, gloo on CPUs).

Data parallel (this part): feature analysis over a dataset sharded by rank (``data_parallel``), patching
sweeps split across ranks (``sweeps``), data-parallel SAE training (``ddp``).
"""

from .data_parallel import (
    all_gather_feature_stats,
    all_gather_topk_state,
    distributed_feature_stats,
    distributed_top_activating_examples,
    merge_topk_states,
    sharded_range,
)
from .ddp import DistributedSAETrainer, shard_rows, train_sae_ddp
from .sweeps import distributed_patch

__all__ = [
    "DistributedSAETrainer",
    "all_gather_feature_stats",
    "all_gather_topk_state",
    "distributed_feature_stats",
    "distributed_patch",
    "distributed_top_activating_examples",
    "merge_topk_states",
    "shard_rows",
    "sharded_range",
    "train_sae_ddp",
]
