"""Time two builds of the C++ extension (``sparsekern/_C*.so``) against each other in ONE process.

``sparsekern bench --quick`` times sub-millisecond calls, and on a shared or virtual machine the spread
between two processes is larger than a few percent. Loading both builds into one interpreter and
alternating them round by round cancels that drift, so a refactor of ``csrc/`` can be held to "no op
slower than 3%"::

    git worktree add /tmp/base <rev> && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/compare_builds.py /tmp/base/sparsekern/_C*.so sparsekern/_C*.so --threads 1

Each op runs on the bench's quick shapes (and the full CPU shapes with ``--full``); per round each build
gets its best of ``reps`` calls, builds alternate which goes first, and the ratio printed is the median
over rounds of new / old (with the quartiles: a ratio is a change only where they exclude 1).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

QUICK = {"quick-a": (128, 64, 2048, 16), "quick-b": (64, 96, 4096, 32), "quick-mem": (256, 64, 8192, 16)}
FULL = {"gpt2-small": (2048, 768, 24576, 32), "gemma-2-2b": (512, 2304, 65536, 64)}  # n, d_in, d_sae, k


def load(path: str, tag: str):
    """The extension at ``path`` as a module of its own (a distinct name: CPython caches by name)."""
    spec = importlib.util.spec_from_file_location(f"{tag}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ops(n: int, d: int, m: int, k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x, W = torch.randn(n, d, generator=g), torch.randn(d, m, generator=g) / d**0.5
    b, b_dec = torch.randn(m, generator=g) * 0.1, torch.randn(d, generator=g) * 0.1
    W_dec = W.T.contiguous()
    vals = torch.rand(n, k, generator=g)
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    thr = torch.full((m,), 1.2)
    grad = torch.randn(n, d, generator=g)
    return {
        "topk_encode": lambda C: C.topk_encode(x, W, b, b_dec, k, True),
        "threshold_encode": lambda C: C.threshold_encode(x, W, b, thr, b_dec),
        "sparse_decode": lambda C: C.sparse_decode(vals, idx, W_dec, b_dec),
        "decode_backward_values": lambda C: C.sparse_decode_backward_values(grad, idx, W_dec),
        "decode_backward_weight": lambda C: C.sparse_decode_backward_weight(grad, vals, idx, m),
    }


def best(f, C, reps: int) -> float:
    t_best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(C)
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--full", action="store_true", help="also the full CPU shapes (minutes)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    old, new = load(a.old, "old_build"), load(a.new, "new_build")
    print(f"threads {a.threads}, {a.rounds} alternating rounds; ms = best over rounds; new/old = median [quartiles]")
    for shape, dims in {**QUICK, **(FULL if a.full else {})}.items():
        for name, f in ops(*dims).items():
            f(old), f(new)  # warm up both
            t0 = time.perf_counter()
            f(new)
            reps = max(3, min(200, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
            ratios, t_old, t_new = [], [], []
            for r in range(a.rounds):
                first, second = (old, new) if r % 2 == 0 else (new, old)
                t1, t2 = best(f, first, reps), best(f, second, reps)
                to, tn = (t1, t2) if r % 2 == 0 else (t2, t1)
                ratios.append(tn / to), t_old.append(to), t_new.append(tn)
            q = statistics.quantiles(ratios, n=4)
            print(f"{shape:10s} {name:22s} old {min(t_old) * 1e3:8.3f}  new {min(t_new) * 1e3:8.3f}  "
                  f"new/old {statistics.median(ratios):.3f} [{q[0]:.3f}, {q[2]:.3f}]")


if __name__ == "__main__":
    main()
