"""Launchable check of the feature-sharded SAE under ``torchrun`` (launch lines: docs/distributed.md).

    torchrun --nproc_per_node=8 -m sparsekern.distributed.demo --backend nccl --d-sae 1048576 --d-in 2304
    torchrun --nproc_per_node=2 -m sparsekern.distributed.demo --backend gloo --d-sae 65536 --d-in 256

Each rank builds its shard of a seeded random TopK SAE (or reads its slice of ``--sae PATH``), encodes
``--tokens`` random rows, checks the first rows against the unsharded op when the SAE is small enough
to rebuild on one rank (``--check``), optionally trains ``--train-steps`` ShardedTrainer steps, and
prints per-rank weight memory and times. Rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsekern.distributed.demo")
    p.add_argument("--backend", choices=("nccl", "gloo"),
                   default="nccl" if torch.cuda.is_available() else "gloo")
    p.add_argument("--sae", default=None, help="a SAELens-format folder (else a random TopK SAE)")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=1 << 16)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--check", action="store_true",
                   help="compare with the unsharded SAE (rebuilt on each rank)")
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=300.0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = _args(argv)
    dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=a.timeout_s))  # env:// (torchrun)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if a.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import sparsekern as sk
    from sparsekern.distributed import ShardedSAE, ShardedTrainer, shard_range
    from sparsekern.distributed.synthetic import synthetic_shard_weights

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = {"architecture": "topk", "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k, "dtype": a.dtype}
    if a.sae:
        sh = sk.SAE.load_from_disk(a.sae, device=str(device), shard=True)
    else:  # every rank draws the same seeded shard-sized blocks (no rank builds the full SAE)
        lo, hi = shard_range(a.d_sae, rank, world)
        w = {k: v.to(device, getattr(torch, a.dtype))
             for k, v in synthetic_shard_weights(a.d_in, lo, hi, 0).items()}
        sh = ShardedSAE.from_local_state_dict({**cfg, "device": str(device)}, w)
    x = torch.randn(a.tokens, sh.cfg.d_in, generator=torch.Generator().manual_seed(1)).to(device, sh.dtype)
    with torch.no_grad():
        sh.encode_sparse(x[:8])  # warm-up
        dist.barrier()
        t0 = time.perf_counter()
        acts = sh.encode_sparse(x)
        recon = sh.decode(acts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    mib = sum(p.numel() * p.element_size() for p in sh.parameters()) / 2**20
    msg = f"rank {rank}/{world}: features [{sh.feature_offset}, {sh.feature_offset + sh.d_sae_local}), " \
          f"weights {mib:.1f} MiB, encode+decode {a.tokens} rows {secs:.3f} s, out {tuple(recon.shape)}"
    if a.check:
        full = sh.to_sae()
        with torch.no_grad():
            ref = full.encode_sparse(x[:64])
        msg += f", indices equal to the unsharded SAE: {torch.equal(ref.indices, acts.indices[:64])}"
    print(msg, flush=True)
    if a.train_steps:
        from sparsekern.training import TrainingConfig

        tcfg = TrainingConfig(architecture="topk", d_in=a.d_in, d_sae=a.d_sae, k=a.k, device=str(device),
                              dtype=a.dtype, checkpoint_path=None)
        tr = ShardedTrainer(tcfg)
        for s in range(a.train_steps):
            m = tr.step(x)
            if rank == 0:
                print(f"step {s}: loss {m['loss']:.4g}, l0 {m['l0']:.1f}, dead {m['dead_fraction']:.3f}",
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
