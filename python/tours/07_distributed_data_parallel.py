"""Tour 07: data-parallel feature analysis, patching and SAE training on torch.distributed.

Every rank builds the same tiny random model and SAE (seeded), takes its shard of the token dataset,
and gets the same merged results as one process over everything (checked at the end on rank 0).

Run (CPU, gloo):  torchrun --nproc_per_node=2 python/tours/07_distributed_data_parallel.py
     (GPUs, NCCL): torchrun --nproc_per_node=8 python/tours/07_distributed_data_parallel.py --nccl
     (no torchrun): python python/tours/07_distributed_data_parallel.py [--quick]
                    starts 2 gloo processes on this machine itself (--quick: a smaller dataset)
"""

import argparse
import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformer_lens import HookedTransformer, HookedTransformerConfig

import sparsekern as sk
import sparsekern.patching as skp
from sparsekern.distributed import (
    DistributedSAETrainer,
    distributed_feature_stats,
    distributed_patch,
    distributed_top_activating_examples,
    free_port,
    init_process_group,
    shard_rows,
    sharded_range,
)
from sparsekern.features import top_activating_examples
from sparsekern.training import SAETrainer, TrainingConfig


def main(args: argparse.Namespace) -> None:
    """The tour on one rank of an initialised process group."""
    warnings.simplefilter("ignore")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.nccl else "cpu"
    if args.nccl:
        torch.cuda.set_device(device)

    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=500,
                                  act_fn="gelu", seed=0, device=device)
    model = HookedTransformer(cfg)
    hook = "blocks.1.hook_resid_post"
    torch.manual_seed(0)
    sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=64, d_sae=1024, k=16, metadata={"hook_name": hook})).to(device)
    n_seq = 32 if args.quick else 64
    tokens = torch.randint(0, 500, (n_seq, 32), generator=torch.Generator().manual_seed(1)).to(device)

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
    acts = torch.randn(3 if args.quick else 5, 128, 64, generator=torch.Generator().manual_seed(2)).to(device)
    trainer.fit([shard_rows(b) for b in acts], progress=False)

    if rank == 0:  # one process over the whole dataset, for comparison
        one = top_activating_examples(sae, tokens.split(8), k=10, model=model, progress=False)
        single = skp.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
        print(f"{world} ranks; top-k bitwise equal to one process: "
              f"{torch.equal(one.values, state.values) and torch.equal(one.locations, state.locations)}")
        print(f"feature stats over {stats.n_tokens} tokens; patching equal: {torch.equal(single, patched)}")
        alone = SAETrainer(tcfg)
        alone.fit(list(acts), progress=False)
        diff = float((alone.sae.W_dec - trainer.sae.W_dec).abs().max())
        print(f"trained {trainer.n_training_steps} steps on {trainer.n_training_tokens} tokens; "
              f"W_dec vs one process on the whole batches: max |diff| {diff:.2e}")


def _local_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    # a localhost gloo group with a timeout: a rank that dies makes the others raise instead of hanging
    init_process_group(rank, world, port, backend="gloo", timeout_s=120)
    try:
        main(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nccl", action="store_true", help="NCCL on one GPU per rank (under torchrun)")
    ap.add_argument("--quick", action="store_true", help="a smaller dataset and fewer training steps")
    ap.add_argument("--nproc", type=int, default=2, help="processes to start without torchrun")
    args = ap.parse_args()
    if "RANK" in os.environ:  # launched by torchrun (env:// rendezvous)
        dist.init_process_group("nccl" if args.nccl else "gloo", timeout=datetime.timedelta(seconds=120))
        main(args)
        dist.destroy_process_group()
    elif args.nccl:
        sys.exit("--nccl needs torchrun: "
                 "torchrun --nproc_per_node=N python/tours/07_distributed_data_parallel.py --nccl")
    else:  # start the ranks ourselves; fork (Linux) reuses this process's imports
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(_local_rank, args=(args.nproc, free_port(), args), nprocs=args.nproc,
                           start_method=method)
