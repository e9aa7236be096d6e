"""Scale-out on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched with ``torchrun``.

- Feature parallelism (``sharded_sae``, ``training``): each rank holds a slice of the features of one
  SAE; encode/decode are exact (see :class:`ShardedSAE`), and :class:`ShardedTrainer` trains it.
- Data parallelism: feature analysis over a dataset sharded by rank (``data_parallel``), patching and
  feature-ablation sweeps split across ranks (``sweeps``, ``ablation``), reconstruction metrics over
  sharded token batches (``metrics``), data-parallel SAE training (``ddp``, global evaluation metrics).

Launch lines and what is exact: docs/distributed.md.
"""

from ._comm import check_agree, free_port, init_process_group, rank_world
from .ablation import distributed_ablate_features
from .data_parallel import (
    all_gather_feature_stats,
    all_gather_topk_state,
    distributed_feature_stats,
    distributed_top_activating_examples,
    merge_topk_states,
    sharded_range,
)
from .ddp import DistributedSAETrainer, shard_rows, train_sae_ddp
from .metrics import distributed_reconstruction_metrics
from .sharded_sae import FEATURE_DIM, ShardedSAE, gather_threshold_code, merge_topk, shard_range
from .sweeps import distributed_patch
from .training import (
    ShardedGatedTrainingModule,
    ShardedJumpReLUTrainingModule,
    ShardedStandardTrainingModule,
    ShardedTopKTrainingModule,
    ShardedTrainer,
)

__all__ = [
    "FEATURE_DIM",
    "DistributedSAETrainer",
    "ShardedGatedTrainingModule",
    "ShardedJumpReLUTrainingModule",
    "ShardedSAE",
    "ShardedStandardTrainingModule",
    "ShardedTopKTrainingModule",
    "ShardedTrainer",
    "all_gather_feature_stats",
    "all_gather_topk_state",
    "check_agree",
    "distributed_ablate_features",
    "distributed_feature_stats",
    "distributed_patch",
    "distributed_reconstruction_metrics",
    "distributed_top_activating_examples",
    "free_port",
    "gather_threshold_code",
    "init_process_group",
    "merge_topk",
    "merge_topk_states",
    "rank_world",
    "shard_range",
    "shard_rows",
    "sharded_range",
    "train_sae_ddp",
]
