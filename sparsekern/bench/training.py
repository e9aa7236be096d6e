"""``sparsekern bench training``: ``sparsekern.training.SAETrainer`` against SAELens's trainer, one process.

The peer is SAELens 6.x's own trainer: ``sae_lens.training.sae_trainer.SAETrainer`` driving a
``TopKTrainingSAE`` / ``JumpReLUTrainingSAE``, stepped through its public per-step seam exactly as its
``fit()`` loop does (``maybe_reset_sparsity()``, ``step(batch)``, ``n_training_steps += 1``): Adam, the
lr scheduler, ``training_forward_pass``, ``loss.backward``, ``clip_grad_norm_(1.0)``, dead-feature
counters. Only the data provider (an in-memory list of batches), wandb logging and checkpointing are
left out (logging is off in its default config; ``fit()`` does nothing else per step).

Both sides get the same pre-generated activations (a planted sparse dictionary plus noise, drawn once
from a seeded CPU generator), the same initial weights (sparsekern's initial parameters are copied into
the SAELens SAE) and the same hyper-parameters (every config field the two configs share is copied from
sparsekern's config into SAELens's, listed in ``info.aligned``).

Cases (issue 12's targets; ``--quick`` shrinks every shape, targets then only informational):

- ``step``: the bare training step, no trainer: TopK encode + decode forward and backward at 768 x 24576,
  N 16384 (4096 on CPU), k 32 (``ops.topk_encode`` + ``ops.sparse_decode``) against the dense torch step;
  GPU targets >= 3.5x in fp32, >= 2.5x in bf16 (``scripts/gpu_checks.sh --training``); on CPU
  informational.
  ``info.encoder_backward`` names the backend of the encoder's input/weight gradients.
- ``throughput``: TopK, 768 -> 24576, k 32, 4096 tokens per step, fp32 (``--dtype bfloat16`` on CUDA:
  parameters and activations in bf16 on both sides). Steps of the two trainers alternate (one timed
  step each, order swapped every step) after warm-up; tokens/s of both; target >= 2x on CPU, >= 2x and
  peak memory <= 1/8 of SAELens's on CUDA. Peak memory: extra memory of one more step
  (``timing.measure_peak``).
- ``quality topk`` / ``quality jumprelu``: the same number of steps on the same batches, then MSE (mean
  over elements) and explained variance (SAELens's formula, ``1 - sum|x - x_hat|^2 / sum|x - mean|^2``)
  of both on the same held-out batch, both evaluated by the same code (SAELens's eval forward with
  each side's trained parameters loaded); target: relative differences <= 2%.
- ``scale``: a d_sae = 2^20 TopK SAE at d_in 768 trains a few steps of 256 tokens, no peer (SAELens's
  ``TopKTrainingSAE`` builds the dense ``[N, d_sae]`` pre-activations, code, and their gradients).
  Reported: peak memory of one step against the parameter bytes and against one fp32 ``[N, d_sae]``
  buffer. Needs about 8x the parameter bytes in RAM (weights, grads, Adam moments); skipped, with a
  note, when the machine has less free memory.

Every case also records, on one extra untimed step, which ops produced a tensor shaped ``[N, d_sae]``
(``TorchDispatchMode``; on CUDA the backward runs on autograd's device thread, so only the forward is
seen there): ``info.dense_ops`` for sparsekern (expected empty) and ``info.peer_dense_ops``.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import backends, ops
from . import runner
from . import table as tb
from . import timing as T
from .trainers import ARCH_EXTRAS, SLStepper, copy_params, pair, sk_trainer, sl_sae

__all__ = ["ARCH_EXTRAS", "CASES", "FIELDS", "PEER", "SLStepper", "SUITE", "copy_params", "dense_ops",
           "eval_metrics", "planted_batches", "quality_case", "scale_case", "sizes", "sk_trainer", "step_case",
           "throughput_case"]

FIELDS = ("case", "shape", "dtype", "sparsekern", "peer", "steps", "sk_ms", "peer_ms", "sk_tok_s",
          "peer_tok_s", "speedup", "sk_mse", "peer_mse", "mse_rel_diff", "sk_ev", "peer_ev", "ev_rel_diff",
          "sk_peak_mib", "peer_peak_mib", "mem_ratio", "target", "target_met", "status", "note", "info")
PEER = "sae_lens.training.sae_trainer.SAETrainer (step seam of fit())"


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(d_in=256, d_sae=2048, k=16, batch=512, warmup=1, steps=3, pool=4,
                    q_steps=10, q_d_sae=1024, lr=1e-3, q_batch=256, scale_d_sae=2**13, scale_batch=128,
                    scale_steps=2, step_n=512, step_repeats=3)
    return dict(d_in=768, d_sae=24576, k=32, batch=4096, warmup=2, steps=20, pool=16,
                q_steps=50, q_d_sae=24576, lr=3e-4, q_batch=1024, scale_d_sae=2**20, scale_batch=256,
                scale_steps=3, step_n=16384, step_n_cpu=4096, step_repeats=10)


# ---- data ----------------------------------------------------------------------------------
def planted_batches(n_batches: int, batch: int, d_in: int, seed: int, n_true: Optional[int] = None,
                    k_true: int = 16, noise: float = 0.05) -> list[Tensor]:
    """Tokens ``x = sum_j m_j D[f_j] + noise``: a random unit-norm dictionary ``D [n_true, d_in]``,
    ``k_true`` features per token (uniform, repeats allowed) with magnitudes ``|N(0, 1)| + 0.5``.
    fp32 on the CPU, seeded (the same batches on every device and for both trainers)."""
    g = torch.Generator().manual_seed(seed)
    n_true = n_true or 4 * d_in
    D = torch.randn(n_true, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    out = []
    with torch.no_grad():
        for _ in range(n_batches):
            idx = torch.randint(0, n_true, (batch, k_true), generator=g)
            mag = torch.randn(batch, k_true, generator=g).abs() + 0.5
            x = ops.sparse_decode(mag, idx, D) + noise * torch.randn(batch, d_in, generator=g)
            out.append(x)
    return out


# ---- [N, d_sae] detector -------------------------------------------------------------------
def dense_ops(fn, n: int, d_sae: int) -> tuple[Any, list[str]]:
    """Run ``fn``; names of the aten/custom ops that produced a tensor of shape [n, d_sae] or [d_sae, n]."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    seen: list[str] = []

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, Tensor) and t.dim() == 2 and {tuple(t.shape)} & {(n, d_sae), (d_sae, n)}:
                    name = str(func.overloadpacket.__name__)
                    if name not in seen:
                        seen.append(name)
            return out

    with Mode():
        out = fn()
    return out, seen


# ---- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def eval_metrics(sl_eval_sae: torch.nn.Module, x: Tensor) -> tuple[float, float]:
    """(MSE per element, explained variance) of SAELens's eval forward on held-out ``x`` (fp32 maths)."""
    sl_eval_sae.eval()
    out = sl_eval_sae(x.to(sl_eval_sae.W_enc.dtype)).float()
    x = x.float()
    err = (out - x).pow(2).sum(-1)
    var = (x - x.mean(0)).pow(2).sum(-1)
    return float(err.mean() / x.shape[1]), float(1 - err.mean() / var.mean())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _row(case: str, shape: str, dtype: torch.dtype, steps: int, target: str, **extra: Any) -> dict[str, Any]:
    extra.setdefault("sparsekern", "sparsekern.training.SAETrainer")
    return dict(case=case, shape=shape, dtype=str(dtype).removeprefix("torch."), steps=steps, target=target,
                status="ok", **extra)


def throughput_case(sz: dict[str, Any], seed: int, dev: torch.device, dtype: torch.dtype,
                    progress: bool) -> dict[str, Any]:
    d_in, d_sae, k, B = sz["d_in"], sz["d_sae"], sz["k"], sz["batch"]
    total = sz["warmup"] + sz["steps"] + 2
    sk, sl, info = pair("topk", d_in, d_sae, k, B, total, seed, dev, dtype, sz["lr"])
    data = [x.to(dev, dtype) for x in planted_batches(sz["pool"], B, d_in, seed + 1)]
    for i in range(sz["warmup"]):
        sk.step(data[i % len(data)])
        sl.step(data[i % len(data)])
    t_sk = t_sl = 0.0
    for i in range(sz["steps"]):
        x = data[(sz["warmup"] + i) % len(data)]
        order = ((sk.step, "sk"), (sl.step, "sl")) if i % 2 == 0 else ((sl.step, "sl"), (sk.step, "sk"))
        for fn, who in order:
            _, ms = T.time_call(lambda: fn(x), dev)
            if who == "sk":
                t_sk += ms / 1e3
            else:
                t_sl += ms / 1e3
        if progress:
            print(f"  throughput step {i + 1}/{sz['steps']}: sk {t_sk:.2f} s, SAELens {t_sl:.2f} s",
                  flush=True)
    _, sk_peak = T.measure_peak(lambda: sk.step(data[0]), dev)
    _, sl_peak = T.measure_peak(lambda: sl.step(data[0]), dev)
    _, info["dense_ops"] = dense_ops(lambda: sk.step(data[1 % len(data)]), B, d_sae)
    _, info["peer_dense_ops"] = dense_ops(lambda: sl.step(data[1 % len(data)]), B, d_sae)
    info["dense_ops"] = ",".join(info["dense_ops"]) or "none"
    info["peer_dense_ops"] = ",".join(info["peer_dense_ops"]) or "none"
    n_tok = sz["steps"] * B
    sk_tps, sl_tps = n_tok / t_sk, n_tok / t_sl
    speed = sk_tps / sl_tps
    mem_ratio = sk_peak / sl_peak if sk_peak is not None and sl_peak else None
    if dev.type == "cuda":
        target = ">= 2x tokens/s, peak memory <= 1/8"
        met = speed >= 2 and mem_ratio is not None and mem_ratio <= 1 / 8
    else:
        target, met = ">= 2x tokens/s", speed >= 2
    return _row("throughput", f"topk {d_in}x{d_sae}, k {k}, {B} tokens/step", dtype, sz["steps"], target,
                peer=PEER, sk_tok_s=sk_tps, peer_tok_s=sl_tps, speedup=speed, sk_peak_mib=sk_peak,
                peer_peak_mib=sl_peak, mem_ratio=mem_ratio, target_met=met, info=info)


def quality_case(arch: str, sz: dict[str, Any], seed: int, dev: torch.device, dtype: torch.dtype,
                 progress: bool) -> dict[str, Any]:
    d_in, d_sae, k, B, n = sz["d_in"], sz["q_d_sae"], sz["k"], sz["q_batch"], sz["q_steps"]
    sk, sl, info = pair(arch, d_in, d_sae, k, B, n, seed, dev, dtype, sz["lr"])
    batches = planted_batches(sz["pool"] + 1, B, d_in, seed + 2)
    held_out = batches.pop().to(dev, dtype)
    data = [x.to(dev, dtype) for x in batches]
    t_sk = t_sl = 0.0
    for i in range(n):
        x = data[i % len(data)]
        t_sk += T.time_call(lambda: sk.step(x), dev)[1] / 1e3
        t_sl += T.time_call(lambda: sl.step(x), dev)[1] / 1e3
        if progress and (i + 1) % max(1, n // 5) == 0:
            print(f"  quality {arch} step {i + 1}/{n}", flush=True)
    # both parameter sets through the same evaluation code: a fresh SAELens SAE of the same config
    evaluator = sl_sae(arch, d_in, d_sae, k, dev, dtype, sk.cfg, [])
    copy_params(sk.sae, evaluator)
    sk_mse, sk_ev = eval_metrics(evaluator, held_out)
    sl_mse, sl_ev = eval_metrics(sl.sae, held_out)
    try:  # sparsekern's own inference SAE on the same batch (semantics check of the export)
        inf = sk.to_inference()
        with torch.no_grad():
            out = inf(held_out).float()
        info["sk_inference_mse"] = round(float((out - held_out.float()).pow(2).mean()), 6)
    except Exception as e:  # informational only
        info["sk_inference_mse"] = f"{type(e).__name__}: {e}"[:120]
    dm, de = _rel(sk_mse, sl_mse), _rel(sk_ev, sl_ev)
    info.update(sk_train_s=round(t_sk, 2), peer_train_s=round(t_sl, 2))
    return _row(f"quality {arch}", f"{arch} {d_in}x{d_sae}" + (f", k {k}" if arch == "topk" else "")
                + f", {B} tokens/step", dtype, n, "MSE and EV within 2%", peer=PEER,
                sk_tok_s=n * B / t_sk, peer_tok_s=n * B / t_sl, speedup=t_sl / t_sk,
                sk_mse=sk_mse, peer_mse=sl_mse, mse_rel_diff=dm, sk_ev=sk_ev, peer_ev=sl_ev, ev_rel_diff=de,
                target_met=bool(dm <= 0.02 and de <= 0.02), info=info)


def _free_bytes(dev: torch.device) -> Optional[int]:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _process_peak_mib(dev: torch.device) -> Optional[float]:
    """The whole process's peak resident memory (weights, grads, Adam moments and all), CPU only."""
    peak = T.process_peak_rss_mib() if dev.type == "cpu" else None
    return None if peak is None else round(peak, 1)


def scale_case(sz: dict[str, Any], seed: int, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    d_in, d_sae, k, B, n = 768, sz["scale_d_sae"], sz["k"], sz["scale_batch"], sz["scale_steps"]
    esize = torch.empty((), dtype=dtype).element_size()
    param_bytes = 2 * d_in * d_sae * esize
    # weights, grads, 2 Adam moments, Adam's per-tensor temporaries and the decoder-norm rescale
    need = 6 * param_bytes + (256 << 20)
    free = _free_bytes(dev)
    fallback = None
    if free is not None and free < need and dtype == torch.float32 and dev.type == "cpu":
        # fp32 weights + grads + two Adam moments of a 2^20 SAE (~24 GiB) exceed a small machine: train the
        # same SAE in bf16 (half of every buffer) rather than not at all, and say so
        fallback = f"bf16: fp32 needs ~{need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB available"
        dtype, esize = torch.bfloat16, 2
        param_bytes = 2 * d_in * d_sae * esize
        need = 6 * param_bytes + (256 << 20)
    shape = f"topk {d_in}x{d_sae}, k {k}, {B} tokens/step" + (", bf16" if fallback else "")
    dense_mib = B * d_sae * 4 / T.MIB
    target = "trains with no [N, d_sae] buffer"
    if free is not None and free < need:
        return _row("scale", shape, dtype, 0, target, peer="none", target_met=None,
                    note=f"skipped: needs ~{need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB available",
                    info=dict(param_mib=round(param_bytes / T.MIB, 1), dense_buffer_mib=round(dense_mib, 1)))
    sk, _ = sk_trainer("topk", d_in, d_sae, k, B, 3e-4, seed, dev, dtype)
    data = [x.to(dev, dtype) for x in planted_batches(2, B, d_in, seed + 3)]
    t0 = time.perf_counter()
    sk.step(data[0])  # first step: grads and Adam moments are allocated here
    first_s = time.perf_counter() - t0
    peaks = []
    proc_peak: Optional[float] = None
    t_steps = 0.0
    for i in range(n):
        (_, peak), s = T.time_call(lambda: T.measure_peak(lambda: sk.step(data[i % 2]), dev), dev)
        peaks.append(peak)
        proc_peak = max(proc_peak or 0, _process_peak_mib(dev) or 0) or None  # HWM was reset per step
        t_steps += s / 1e3
    _, dense = dense_ops(lambda: sk.step(data[1]), B, d_sae)
    peak = max(peaks) if all(p is not None for p in peaks) else None
    info = dict(param_mib=round(param_bytes / T.MIB, 1), dense_buffer_mib=round(dense_mib, 1),
                first_step_s=round(first_s, 2), step_s=round(t_steps / n, 2),
                dense_ops=",".join(dense) or "none",
                peak_over_params=None if peak is None else round(peak / (param_bytes / T.MIB), 3),
                peak_over_dense_buffer=None if peak is None else round(peak / dense_mib, 3),
                process_peak_rss_mib=proc_peak, dtype_fallback=fallback)
    return _row("scale", shape, dtype, n, target,
                peer="none (SAELens builds dense [N, d_sae] acts and grads)",
                sk_tok_s=n * B / t_steps, sk_peak_mib=peak, target_met=not dense, info=info,
                note="peak: extra memory of one step after the first (grads are re-allocated every step)")


# ---- the bare training step (no trainer, no optimiser) -------------------------------------
def step_case(sz: dict[str, Any], seed: int, dev: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """TopK encode + decode, forward and backward (grads of W_enc, b_enc, W_dec, b_dec) of the
    reconstruction loss: ``ops.topk_encode`` + ``ops.sparse_decode`` against the dense torch step
    (``pre.topk`` -> dense code by scatter -> ``code @ W_dec``). Interleaved medians
    (``timing.interleaved_ms``); issue 12's GPU targets: >= 3.5x in fp32, >= 2.5x in bf16."""
    d_in, d_sae, k = sz["d_in"], sz["d_sae"], sz["k"]
    # off the GPU the N 16384 would hold ~8 GB of dense [N, d_sae] fp32 buffers for the peer
    n = sz["step_n"] if dev.type == "cuda" else sz.get("step_n_cpu", sz["step_n"])
    g = torch.Generator().manual_seed(seed + 4)
    W_enc = torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in)
    params = [W_enc, torch.randn(d_sae, generator=g) * 0.1, W_enc.t().contiguous(),
              torch.randn(d_in, generator=g) * 0.1]
    params = [p.to(dev, dtype).requires_grad_(True) for p in params]
    x = torch.randn(n, d_in, generator=g).to(dev, dtype)

    def sparse() -> tuple[Tensor, ...]:
        We, be, Wd, bd = params
        acts = ops.topk_encode(x, We, be, k, b_dec=bd)
        out = ops.sparse_decode(acts.values, acts.indices, Wd, bd)
        return torch.autograd.grad((out.float() - x.float()).pow(2).sum(), params)

    def dense() -> tuple[Tensor, ...]:
        We, be, Wd, bd = params
        pre = (x - bd) @ We + be
        v, i = pre.topk(k, dim=1)
        code = torch.zeros_like(pre).scatter(1, i, v.relu())
        out = code @ Wd + bd
        return torch.autograd.grad((out.float() - x.float()).pow(2).sum(), params)

    ours, dense_out = sparse(), dense()  # warm-up (and the cross-check)
    diff = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
               for a, b in zip(ours, dense_out))
    del ours, dense_out
    reps = sz["step_repeats"]
    sk_ms, dense_ms = (T.median(t) for t in T.interleaved_ms([sparse, dense], dev, reps))
    _, sk_peak = T.measure_peak(sparse, dev)
    _, dense_peak = T.measure_peak(dense, dev)
    speed = dense_ms / sk_ms
    need = {torch.float32: 3.5, torch.bfloat16: 2.5}.get(dtype)
    on_gpu = dev.type == "cuda" and need is not None
    return _row("step", f"topk {d_in}x{d_sae}, k {k}, N {n}", dtype, reps,
                f">= {need}x the dense torch step (GPU)" if on_gpu else "informational (targets are GPU)",
                sparsekern="ops.topk_encode + ops.sparse_decode, fwd+bwd",
                peer="dense torch: pre.topk -> scatter -> code @ W_dec, fwd+bwd",
                sk_ms=sk_ms, peer_ms=dense_ms,
                speedup=speed, sk_peak_mib=sk_peak, peer_peak_mib=dense_peak,
                mem_ratio=sk_peak / dense_peak if sk_peak is not None and dense_peak else None,
                target_met=bool(speed >= need) if on_gpu else None,
                info=dict(grad_rel_diff=diff, encode=backends.select("topk_encode", dev)[0],
                          encoder_backward=backends.select("encode_backward_input", dev)[0]))


# ---- the suite, as the runner sees it -------------------------------------------------------
NAME = "training"
CASES = ("step", "throughput", "quality_topk", "quality_jumprelu", "scale")
COLUMNS = FIELDS


def run_case(opts: runner.Options, name: str) -> list[dict[str, Any]]:
    """The row of case ``name`` (one of :data:`CASES`) at ``opts.dtype``."""
    sz, seed, dev, dtype, progress = sizes(opts.quick), opts.seed, opts.device, opts.dtype, opts.progress
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "throughput": lambda: throughput_case(sz, seed, dev, dtype, progress),
        "step": lambda: step_case(sz, seed, dev, dtype),
        "quality_topk": lambda: quality_case("topk", sz, seed, dev, dtype, progress),
        "quality_jumprelu": lambda: quality_case("jumprelu", sz, seed, dev, dtype, progress),
        "scale": lambda: scale_case(sz, seed, dev, dtype),
    }
    return [runners[name]()]


def jobs(opts: runner.Options) -> list[runner.Job]:
    """The selected cases, in the order given."""
    return [runner.Job(name, functools.partial(run_case, opts, name), {"case": name})
            for name in SUITE.selected(opts)]


def _rate(key: str, ms_key: str) -> tb.Column:
    """tokens/s, or the time of one step (the ``step`` case) in ms."""
    head = "sk tok/s|ms" if key.startswith("sk") else "peer tok/s|ms"
    return tb.Column(head, lambda r: tb.value(r.get(key), ".0f") if r.get(ms_key) is None
                     else tb.value(r.get(ms_key), ".2f", " ms"), right=True)


TABLE = (
    tb.text("case", "case"), tb.text("shape", "shape"), tb.text("dtype", "dtype"),
    tb.num("steps", "steps", "d"), _rate("sk_tok_s", "sk_ms"), _rate("peer_tok_s", "peer_ms"),
    tb.ratio("sk/peer", "speedup"), tb.num("sk MSE", "sk_mse", ".4g"), tb.num("peer MSE", "peer_mse", ".4g"),
    tb.num("dMSE", "mse_rel_diff", ".2%"),
    tb.num("sk EV", "sk_ev", ".4f"), tb.num("peer EV", "peer_ev", ".4f"), tb.num("dEV", "ev_rel_diff", ".2%"),
    tb.num("sk MiB", "sk_peak_mib", ".0f"), tb.num("peer MiB", "peer_peak_mib", ".0f"),
    tb.text("target", "target"), tb.MET,
)

SUITE = runner.Suite(
    name=NAME, cases=CASES, columns=COLUMNS, table=TABLE, jobs=jobs,
    settings=lambda opts: {"seed": opts.seed, "dtype": opts.dtype_name}, meta={"peer": PEER},
    description="sparsekern.training's SAE trainer against SAELens's trainer (throughput, quality, "
    "d_sae 2^20 scale); --dtype applies",
    options=frozenset({"--dtype"}),
    header=lambda opts, meta: opts.dtype_name,
    footer=lambda opts, meta: [f"peer: {PEER}; same activations, same initial weights, same steps"],
)
