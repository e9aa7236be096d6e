"""``sparsekern bench features``: feature-analysis workloads against the dense torch way, one process.

Cases (issue 11's CPU targets; ``--quick`` shrinks every shape, targets then only informational):

- ``stats``: :class:`FeatureStats` (counts, histograms, full co-occurrence) over ``STREAM_TOKENS`` tokens
  of a 768 -> 24576, k 32 TopK SAE, against only encoding those tokens: encode + stats <= 1.5x encode.
- ``stats vs dense``: the same statistics the dense torch way (seed 004: dense acts, ``(acts > 0).T @
  (acts > 0)``, sums, ...) on a few batches: >= 10x faster per token, >= 50x less peak memory per update.
- ``conditioned``: ``sum_t a_f(t) y(t)`` and counts of ``y > 0`` given f, ``[F, 3072]``, against dense
  ``acts.T @ y`` and ``(acts > 0).T @ (y > 0)``: >= 10x.
- ``neighbours``: ``decoder_neighbours`` at d_sae 65536, k 32, against a chunked dense ``W @ W.T`` +
  ``topk``: >= 2x, in O(d_sae k) memory.
- ``ablation``: 32 active features x 15 positions on a GPT-2-small-shaped random model
  (``sparsekern.patching.feature_ablation``) against one hooked forward per ablation (sampled, scaled):
  >= 10x.

Times are wall clock on the whole workload (one run each; the workloads are seconds to minutes long;
on CUDA with a device sync around each timed piece); peak memory is the extra of one update / call
(``timing.measure_peak``). Inputs are drawn on the CPU from seeded generators and moved to the device.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .. import ops
from ..sparse_acts import SparseActs
from . import runner
from . import table as tb
from . import timing as T

FIELDS = ("case", "shape", "sparsekern", "peer", "sk_s", "peer_s", "speedup", "target", "target_met",
          "sk_peak_mib", "peer_peak_mib", "max_abs_diff", "status", "note", "info")
F_STATS, D_IN, K, BATCH = 24576, 768, 32, 4096
STREAM_TOKENS = 2**20  # "streamed over >= 1M tokens"
D_MLP = 3072
NEIGHBOUR_SAE, NEIGHBOUR_K = 65536, 32


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(F=2048, batch=512, stream=4096, dense_batches=1, dense_batch=256, cond_batches=1,
                    d_mlp=256, nb_sae=2048, chunk=512)
    return dict(F=F_STATS, batch=BATCH, stream=STREAM_TOKENS, dense_batches=2, dense_batch=1024,
                cond_batches=2, d_mlp=D_MLP, nb_sae=NEIGHBOUR_SAE, chunk=4096)


def _encoder(F: int, seed: int, dev: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_IN, F, generator=g) / math.sqrt(D_IN)
    return W.to(dev), (torch.randn(F, generator=g) * 0.1).to(dev)


def _randn(g: torch.Generator, dev: torch.device, *size: int) -> Tensor:
    return torch.randn(*size, generator=g).to(dev)  # drawn on the CPU: the same numbers on every device


def _row(case: str, shape: str, sk: str, peer: str, sk_s: float, peer_s: float, target: str, met: bool,
         **extra: Any) -> dict[str, Any]:
    return dict(case=case, shape=shape, sparsekern=sk, peer=peer, sk_s=sk_s, peer_s=peer_s,
                speedup=peer_s / sk_s if sk_s > 0 else None, target=target, target_met=met, status="ok",
                **extra)


def _timed(fn: Callable[[], Any], dev: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one synchronised call (``timing.time_call`` in seconds)."""
    out, ms = T.time_call(fn, dev)
    return out, ms / 1e3


# ---- FeatureStats over a stream ------------------------------------------------------------
def stats_case(sz: dict[str, int], seed: int, progress: bool, dev: torch.device) -> dict[str, Any]:
    """Encode + FeatureStats.update per batch, each timed, over the whole stream (fresh x per batch)."""
    from tqdm.auto import tqdm

    from ..features import FeatureStats

    F, B = sz["F"], sz["batch"]
    W, b = _encoder(F, seed, dev)
    stats = FeatureStats(F, histogram=True, cooccurrence=True, device=dev)
    g = torch.Generator().manual_seed(seed + 1)
    t_enc = t_upd = 0.0
    n_batches = sz["stream"] // B
    for _ in tqdm(range(n_batches), desc="stats stream", unit="batch", disable=not progress):
        x = _randn(g, dev, B, D_IN)
        acts, dt = _timed(lambda: ops.topk_encode(x, W, b, K), dev)
        t_enc += dt
        t_upd += _timed(lambda: stats.update(acts), dev)[1]
    _, peak = T.measure_peak(lambda: stats.update(acts), dev)  # one more update
    total = t_enc + t_upd
    return _row("stats", f"{D_IN}x{F}, k {K}, {n_batches * B} tokens", "encode + FeatureStats.update",
                "encode only", total, t_enc, "encode + stats <= 1.5x encode", total <= 1.5 * t_enc,
                sk_peak_mib=peak, info=dict(update_s=round(t_upd, 2), encode_s=round(t_enc, 2),
                                            overhead=round(total / t_enc, 3)))


def _dense_stats_update(acts: SparseActs, F: int, st: dict[str, Tensor], edges: Tensor) -> None:
    """Seed 004's way: a dense [N, F] code, then column reductions and (acts > 0).T @ (acts > 0)."""
    dense = acts.to_dense(F)
    fire = (dense > 0).float()
    st["counts"] += fire.sum(0).long()
    st["sum"] += dense.sum(0).double()
    st["sq"] += (dense * dense).sum(0).double()
    torch.maximum(st["max"], dense.amax(0).double(), out=st["max"])
    rows, cols = fire.nonzero(as_tuple=True)
    bins = torch.bucketize(dense[rows, cols], edges)
    st["hist"].view(-1).index_add_(0, cols * (edges.numel() + 1) + bins, torch.ones_like(bins))
    st["co"] += fire.T @ fire


def stats_dense_case(sz: dict[str, int], seed: int, dev: torch.device) -> dict[str, Any]:
    from ..features import FeatureStats

    F, B, nb = sz["F"], sz["dense_batch"], sz["dense_batches"]
    W, b = _encoder(F, seed, dev)
    g = torch.Generator().manual_seed(seed + 2)
    codes = [ops.topk_encode(_randn(g, dev, B, D_IN), W, b, K) for _ in range(nb + 1)]
    ours = FeatureStats(F, histogram=True, cooccurrence=True, device=dev)
    edges = ours.hist_edges.float().to(dev)
    z = functools.partial(torch.zeros, device=dev)
    st = dict(counts=z(F, dtype=torch.long), sum=z(F, dtype=torch.float64), sq=z(F, dtype=torch.float64),
              max=z(F, dtype=torch.float64), hist=z(F, edges.numel() + 1, dtype=torch.long), co=z(F, F))
    ours.update(codes[0])  # warm-up (first-touch of the tables) for both sides
    _dense_stats_update(codes[0], F, st, edges)
    _, sk_s = _timed(lambda: [ours.update(c) for c in codes[1:]], dev)
    _, dense_s = _timed(lambda: [_dense_stats_update(c, F, st, edges) for c in codes[1:]], dev)
    _, sk_peak = T.measure_peak(lambda: ours.update(codes[1]), dev)
    _, dense_peak = T.measure_peak(lambda: _dense_stats_update(codes[1], F, st, edges), dev)
    diff = float((ours.cooccurrence.double() - st["co"].double()).abs().max())  # same batches on both sides
    mem_ok = sk_peak is not None and dense_peak is not None and dense_peak >= 50 * max(sk_peak, 1e-3)
    return _row("stats vs dense", f"{D_IN}x{F}, k {K}, {nb} x {B} tokens", "FeatureStats.update",
                "dense acts + (acts>0).T @ (acts>0) + column sums", sk_s, dense_s,
                ">= 10x faster, >= 50x less peak memory", dense_s >= 10 * sk_s and mem_ok,
                sk_peak_mib=sk_peak, peer_peak_mib=dense_peak, max_abs_diff=diff,
                note="max_abs_diff: co-occurrence counts (dense counted in float32)")


def conditioned_case(sz: dict[str, int], seed: int, dev: torch.device) -> dict[str, Any]:
    from ..features import FeatureStats

    F, B, nb, d_y = sz["F"], sz["batch"], sz["cond_batches"], sz["d_mlp"]
    W, b = _encoder(F, seed, dev)
    g = torch.Generator().manual_seed(seed + 3)
    data = [(ops.topk_encode(_randn(g, dev, B, D_IN), W, b, K), _randn(g, dev, B, d_y).relu())
            for _ in range(nb + 1)]
    ours = FeatureStats(F, histogram=False, conditioned_on=d_y, device=dev)
    acc = [torch.zeros(F, d_y, device=dev), torch.zeros(F, d_y, device=dev)]

    def dense(acts: SparseActs, y: Tensor) -> None:
        a = acts.to_dense(F)
        acc[0] += a.T @ y
        acc[1] += (a > 0).float().T @ (y > 0).float()

    ours.update(data[0][0], y=data[0][1])  # warm-up: first touch of the [F, d_y] tables
    dense(*data[0])
    _, sk_s = _timed(lambda: [ours.update(a, y=y) for a, y in data[1:]], dev)
    _, dense_s = _timed(lambda: [dense(a, y) for a, y in data[1:]], dev)
    diff = float((ours.cond_act_sum - acc[0].double()).abs().max() / acc[0].abs().max().clamp_min(1e-30))
    return _row("conditioned", f"F {F}, d_y {d_y}, {nb} x {B} tokens", "FeatureStats(conditioned_on=d_y)",
                "dense a.T @ y + (a>0).T @ (y>0)", sk_s, dense_s, ">= 10x faster", dense_s >= 10 * sk_s,
                max_abs_diff=diff, note="max_abs_diff: relative, sum a_f y")


def neighbours_case(sz: dict[str, int], seed: int, dev: torch.device) -> dict[str, Any]:
    from ..features import decoder_neighbours

    F, k, chunk = sz["nb_sae"], NEIGHBOUR_K, sz["chunk"]
    W_dec = _randn(torch.Generator().manual_seed(seed + 4), dev, F, D_IN)

    def dense() -> tuple[Tensor, Tensor]:
        Wn = W_dec / W_dec.norm(dim=1, keepdim=True)
        vals, idx = [], []
        for r0 in range(0, F, chunk):
            cos = Wn[r0:r0 + chunk] @ Wn.T
            rows = torch.arange(cos.shape[0], device=dev)
            cos[rows, rows + r0] = -math.inf  # self
            v, i = cos.topk(k, dim=1)
            vals.append(v)
            idx.append(i)
        return torch.cat(vals), torch.cat(idx)

    decoder_neighbours(W_dec[:chunk], k, progress=False)  # warm-up (first call of the op's thread pool)
    ours_fn = lambda: decoder_neighbours(W_dec, k, progress=False)  # noqa: E731
    (ours, sk_peak), sk_s = _timed(lambda: T.measure_peak(ours_fn, dev), dev)
    ((dv, di), dense_peak), dense_s = _timed(lambda: T.measure_peak(dense, dev), dev)
    same = float((ours.indices == di).float().mean())
    return _row("neighbours", f"d_sae {F}, d_in {D_IN}, k {k}", "decoder_neighbours",
                f"chunked dense W @ W.T ({chunk} rows) + topk", sk_s, dense_s, ">= 2x faster",
                dense_s >= 2 * sk_s, sk_peak_mib=sk_peak, peer_peak_mib=dense_peak,
                max_abs_diff=float((ours.values - dv).abs().max()), info=dict(same_indices=round(same, 5)))


def ablation_case(quick: bool, seed: int, dev: torch.device, sample: int = 8) -> dict[str, Any]:
    """Per-position ablation of 32 always-active features of a JumpReLU SAE at blocks.6.hook_resid_pre."""
    import sparsekern as sk
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from ..patching.feature_ablation import ablate_features

    n_active, n_pos, d_sae = (8, 6, 256) if quick else (32, 15, 4096)
    dims = (dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=128, d_vocab=101) if quick else
            dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257))
    hook = "blocks.1.hook_resid_pre" if quick else "blocks.6.hook_resid_pre"
    cfg = HookedTransformerConfig(**dims, n_ctx=32, act_fn="gelu_new", normalization_type="LN", seed=seed,
                                  device=str(dev))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg).eval()
    sae_cfg = sk.JumpReLUSAEConfig(d_in=cfg.d_model, d_sae=d_sae)
    sae_cfg.metadata.hook_name = hook
    sae = sk.JumpReLUSAE(sae_cfg).eval()
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(cfg.d_model, d_sae, generator=g) * 0.01)
        sae.W_dec.copy_(torch.randn(d_sae, cfg.d_model, generator=g) * 0.05)
        sae.b_enc.fill_(-10.0)
        sae.b_enc[:n_active] = 10.0  # these fire at every position, the others never
    sae.to(dev)
    tokens = torch.randint(0, cfg.d_vocab, (1, n_pos), generator=g).to(dev)

    def metric(logits: Tensor) -> Tensor:
        return logits[:, -1, 3] - logits[:, -1, 7]

    res, sk_s = _timed(lambda: ablate_features(model, tokens, sae, metric, per_position=True,
                                               progress=False), dev)
    n = int(res.active.sum())
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        code = sae.encode(cache[hook])
        base = metric(model(tokens))
    cells = res.active.nonzero().tolist()
    picks = [cells[i] for i in torch.randperm(len(cells), generator=g)[:sample].tolist()]
    T.sync(dev)
    err, t0 = 0.0, time.perf_counter()
    for row, p in picks:
        f = int(res.feature_ids[row])

        def sub(act: Tensor, hook: Any = None, f: int = f, p: int = p) -> Tensor:
            act = act.clone()
            act[:, p] -= code[:, p, f, None] * sae.W_dec[f]
            return act

        with torch.no_grad():
            val = metric(model.run_with_hooks(tokens, fwd_hooks=[(hook, sub)])) - base
        err = max(err, float((val - res.values[row, p]).abs().max()))
    T.sync(dev)
    hooked_s = (time.perf_counter() - t0) / len(picks) * n
    return _row("ablation", f"{cfg.n_layers} layers x {cfg.d_model}, {n_active} features x {n_pos} positions",
                "patching.feature_ablation.ablate_features",
                "one hooked forward per ablation (sampled, scaled)",
                sk_s, hooked_s, ">= 10x faster", hooked_s >= 10 * sk_s, max_abs_diff=err,
                info=dict(ablations=n, hooked_sampled=len(picks)))


# ---- the suite, as the runner sees it -------------------------------------------------------
NAME = "features"
CASES = ("stats", "stats_dense", "conditioned", "neighbours", "ablation")
COLUMNS = FIELDS
TABLE = (
    tb.text("case", "case"), tb.text("shape", "shape"), tb.num("sk s", "sk_s", ".2f"),
    tb.num("peer s", "peer_s", ".2f"), tb.ratio("peer/sk", "speedup"), tb.text("target", "target"), tb.MET,
    tb.num("sk MiB", "sk_peak_mib", ".1f"), tb.num("peer MiB", "peer_peak_mib", ".1f"),
    tb.num("max|diff|", "max_abs_diff", ".2e"),
)


def run_case(opts: runner.Options, name: str) -> list[dict[str, Any]]:
    """The row of case ``name`` (one of :data:`CASES`), under ``torch.no_grad()``."""
    sz, seed, dev = _sizes(opts.quick), opts.seed, opts.device
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "stats": lambda: stats_case(sz, seed, opts.progress, dev),
        "stats_dense": lambda: stats_dense_case(sz, seed, dev),
        "conditioned": lambda: conditioned_case(sz, seed, dev),
        "neighbours": lambda: neighbours_case(sz, seed, dev),
        "ablation": lambda: ablation_case(opts.quick, seed, dev),
    }
    with torch.no_grad():
        return [runners[name]()]


def jobs(opts: runner.Options) -> list[runner.Job]:
    """The selected cases, in the order given."""
    return [runner.Job(name, functools.partial(run_case, opts, name), {"case": name})
            for name in SUITE.selected(opts)]


SUITE = runner.Suite(
    name=NAME, cases=CASES, columns=COLUMNS, table=TABLE, jobs=jobs,
    settings=lambda opts: {"seed": opts.seed},
    description="feature analysis (FeatureStats, co-occurrence, conditioned sums, decoder neighbours, "
    "feature ablation) against the dense torch way",
)
