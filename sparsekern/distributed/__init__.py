"""Scale-out on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched with ``torchrun``.

Feature parallelism (this package's ``sharded_sae`` / ``training``): each rank holds a slice of the
features of one SAE; encode/decode are exact (see :class:`ShardedSAE`). Data parallelism lives beside
it (``data_parallel``, ``sweeps``, ``ddp``). Launch lines: README, "Scale out (torch.distributed)".
"""

from ._comm import check_agree, free_port, init_process_group, rank_world
from .sharded_sae import FEATURE_DIM, ShardedSAE, gather_threshold_code, merge_topk, shard_range
from .training import ShardedJumpReLUTrainingModule, ShardedTopKTrainingModule, ShardedTrainer

# ---- data parallelism (data_parallel.py, sweeps.py, ddp.py): exports added when that work merges ----

__all__ = [
    "FEATURE_DIM",
    "ShardedJumpReLUTrainingModule",
    "ShardedSAE",
    "ShardedTopKTrainingModule",
    "ShardedTrainer",
    "check_agree",
    "free_port",
    "gather_threshold_code",
    "init_process_group",
    "merge_topk",
    "rank_world",
    "shard_range",
]
