"""Walk-through: data-parallel feature analysis, patching and SAE training on torch.distributed.

Every rank builds the same tiny random model and SAE (seeded), takes its shard of the token dataset,
and gets the same merged results as one process over everything (checked at the end on rank 0).

Run (CPU, gloo):  torchrun --nproc_per_node=2 python/07_distributed_data_parallel.py
     (GPUs, NCCL): torchrun --nproc_per_node=8 python/07_distributed_data_parallel.py --nccl
"""

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
import sparsekern.patching as skp
from sparsekern.distributed import (
    DistributedSAETrainer,
    distributed_feature_stats,
    distributed_patch,
    distributed_top_activating_examples,
    shard_rows,
    sharded_range,
)
from sparsekern.features import top_activating_examples
from sparsekern.training import TrainingConfig

warnings.simplefilter("ignore")
nccl = "--nccl" in sys.argv
# a timeout on the group: a rank that dies makes the others raise instead of hanging forever
dist.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if nccl else "cpu"
if nccl:
    torch.cuda.set_device(device)

cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=500,
                              act_fn="gelu", seed=0, device=device)
model = HookedTransformer(cfg)
hook = "blocks.1.hook_resid_post"
torch.manual_seed(0)
sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=64, d_sae=1024, k=16, metadata={"hook_name": hook})).to(device)
tokens = torch.randint(0, 500, (64, 32), generator=torch.Generator().manual_seed(1)).to(device)

# 1) top activating examples + feature statistics over this rank's sequences, merged on every rank
mine = sharded_range(tokens.shape[0])  # contiguous: sequences [start, stop) of the dataset
shard = tokens[mine.start:mine.stop]
state = distributed_top_activating_examples(sae, shard.split(8), k=10, seq_offset=mine.start, model=model,
                                            progress=False)
stats = distributed_feature_stats(sae, shard.split(8), model=model, progress=False)

# 2) a patching sweep, its patches split across the ranks
clean, corrupted = tokens[:2], tokens[2:4]
_, cache = model.run_with_cache(clean)


def metric(logits):
    return logits[:, -1].log_softmax(-1)[:, 7].mean()


patched = distributed_patch(skp.get_act_patch_resid_pre, model, corrupted, cache, metric, progress=False)

# 3) data-parallel training: each rank steps on its rows of every batch
tcfg = TrainingConfig(architecture="topk", d_in=64, d_sae=256, k=8, device=device, checkpoint_path=None)
trainer = DistributedSAETrainer(tcfg)
acts = torch.randn(5, 128, 64, generator=torch.Generator().manual_seed(2)).to(device)
trainer.fit([shard_rows(b) for b in acts], progress=False)

if rank == 0:
    one = top_activating_examples(sae, tokens.split(8), k=10, model=model, progress=False)
    single = skp.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    print(f"{world} ranks; top-k bitwise equal to one process: "
          f"{torch.equal(one.values, state.values) and torch.equal(one.locations, state.locations)}")
    print(f"feature stats over {stats.n_tokens} tokens; patching equal: {torch.equal(single, patched)}")
    print(f"trained {trainer.n_training_steps} steps on {trainer.n_training_tokens} tokens")
dist.destroy_process_group()
