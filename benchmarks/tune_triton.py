"""Strategy and tile sweep for the Triton encoders/decoder on a CUDA GPU (run on the GPU machine,
prints a table and writes JSON). Not part of CI: `python benchmarks/tune_triton.py --out DIR`.

For each shape and dtype it times the bare cuBLAS matmul, a chunked cuBLAS + ``torch.topk`` encoder,
and ``topk_encode`` / ``threshold_encode`` under each strategy of ``sparsekern/triton/encode.py``:
"blocks" at several memory budgets (block widths), "fused" at several GEMM tiles
(``SPARSEKERN_ENCODE_FUSED_TILE``) and "tiles". The defaults there (``_gemm_config``, ``budget``)
and the decode blocks (``decode._blocks``) are chosen from these measurements. Times are medians of
CUDA-event timings after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

SHAPES = {  # (N, d_in, d_sae, k): issue 10's encoder shapes
    "gpt2-n16384": (16384, 768, 24576, 32),
    "gemma-n4096": (4096, 2304, 65536, 64),
}
FUSED_TILES = ["128,64,64,8,3", "128,64,64,8,4", "128,128,64,8,3", "64,128,64,4,3", "128,256,64,8,3"]
BUDGETS_MIB = ["256", "512", "1024"]
SELECT_TILES = ["8,8", "4,4", "8,4", "16,8"]  # SPARSEKERN_ENCODE_SELECT_TILE (rows, warps) for "blocks"
DEC_BLOCKS = [(16, 256, 4), (32, 256, 4), (16, 128, 4), (16, 512, 8), (32, 1024, 8)]


def bench(fn: Callable[[], object], reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def chunked_cublas_topk(x, W, b, bd, k, chunk):
    """(values, indices) via cuBLAS on [N, chunk] column blocks + torch.topk, merged at the end."""
    xc = x - bd
    vs, ids = [], []
    for c0 in range(0, W.shape[1], chunk):
        pre = torch.addmm(b[c0:c0 + chunk], xc, W[:, c0:c0 + chunk])
        v, i = pre.topk(k, dim=1)
        vs.append(v)
        ids.append(i + c0)
    v, i = torch.cat(vs, 1), torch.cat(ids, 1)
    top = v.topk(k, dim=1)
    return top.values.clamp_min(0), i.gather(1, top.indices)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from sparsekern import _backend, ops
    from sparsekern.triton import decode as tdec

    dev = torch.device("cuda")
    rows = []
    orig_blocks = tdec._blocks
    for name, (n, d_in, d_sae, k) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(n, d_in, device=dev, generator=g).to(dt)
            W = (torch.randn(d_in, d_sae, device=dev, generator=g) / d_in**0.5).to(dt)
            b = torch.randn(d_sae, device=dev, generator=g).to(dt) * 0.1
            bd = torch.randn(d_in, device=dev, generator=g).to(dt) * 0.1
            thr = float(((x[:256] - bd) @ W + b).float().flatten().kthvalue(256 * (d_sae - 64)).values)
            base = dict(shape=name, dtype=str(dt).split(".")[1])
            rows.append({**base, "what": "matmul", "ms": bench(lambda: x @ W)})
            rows.append({**base, "what": "cublas+topk chunk=16384",
                         "ms": bench(lambda: chunked_cublas_topk(x, W, b, bd, k, 16384))})
            runs = [("tiles", {}), *[("blocks", {"SPARSEKERN_ENCODE_BUDGET_MIB": m}) for m in BUDGETS_MIB],
                    *[("blocks", {"SPARSEKERN_ENCODE_SELECT_TILE": t}) for t in SELECT_TILES[1:]],
                    *[("fused", {"SPARSEKERN_ENCODE_FUSED_TILE": t})
                      for t in FUSED_TILES[: 2 if args.quick else None]]]
            ref_i = None
            for strategy, env in runs:
                os.environ.update({"SPARSEKERN_ENCODE_STRATEGY": strategy, **env})
                what = f"{strategy} {' '.join(f'{k_}={v}' for k_, v in env.items())}"
                try:
                    with _backend.use_backend("triton"):
                        for op, fn in (("topk", lambda: ops.topk_encode(x, W, b, k, b_dec=bd)),
                                       ("threshold", lambda: ops.threshold_encode(x, W, b, thr, b_dec=bd))):
                            ms = bench(fn)
                            out = fn()
                            same = None
                            if op == "topk":
                                ref_i = out.indices if ref_i is None else ref_i
                                same = bool(torch.equal(out.indices, ref_i))
                            rows.append({**base, "what": f"{op} {what}", "ms": ms, "same_idx": same})
                except Exception as e:  # a tile that does not compile / runs out of resources
                    rows.append({**base, "what": what, "error": f"{type(e).__name__}: {e}"[:200]})
                finally:
                    for key in ("SPARSEKERN_ENCODE_STRATEGY", *env):
                        os.environ.pop(key, None)
        # decode (the bench's shape: n rows, k active, d = d_in)
        for dt in (torch.float32, torch.bfloat16):
            Wd = (torch.randn(d_sae, d_in, device=dev, generator=g)).to(dt)
            vals = torch.rand(n, k, device=dev, generator=g).to(dt)
            idx = torch.stack([torch.randperm(d_sae, device=dev, generator=g)[:k] for _ in range(n)])
            base = dict(shape=name, dtype=str(dt).split(".")[1])
            rows.append({**base, "what": "embedding_bag", "ms": bench(
                lambda: torch.nn.functional.embedding_bag(idx, Wd, per_sample_weights=vals, mode="sum"))})
            with _backend.use_backend("cuda"):
                rows.append({**base, "what": "cuda decode", "ms": bench(lambda: ops.sparse_decode(vals, idx, Wd))})
            for blk in DEC_BLOCKS:
                tdec._blocks = lambda t_, d_, blk=blk: blk
                try:
                    with _backend.use_backend("triton"):
                        rows.append({**base, "what": f"triton decode blocks={blk}",
                                     "ms": bench(lambda: ops.sparse_decode(vals, idx, Wd))})
                except Exception as e:
                    rows.append({**base, "what": f"triton decode blocks={blk}", "error": str(e)[:200]})
            tdec._blocks = orig_blocks
    for r in rows:
        print(f"{r['shape']:11s} {r['dtype']:9s} {r['what']:60s} "
              f"{r.get('ms', float('nan')):8.3f} ms {r.get('same_idx', '')} {r.get('error', '')}")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, when=time.strftime("%Y%m%d-%H%M%S"))
    path = os.path.join(args.out, f"tune-triton-{meta['when']}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
