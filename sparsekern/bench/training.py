"""``sparsekern bench --training``: ``sparsekern.training.SAETrainer`` against SAELens's trainer, one process.

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

import dataclasses
import math
import time
import traceback
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops
from . import report
from . import timing as T

FIELDS = ("case", "shape", "dtype", "sparsekern", "peer", "steps", "sk_ms", "peer_ms", "sk_tok_s",
          "peer_tok_s", "speedup", "sk_mse", "peer_mse", "mse_rel_diff", "sk_ev", "peer_ev", "ev_rel_diff",
          "sk_peak_mib", "peer_peak_mib", "mem_ratio", "target", "target_met", "status", "note", "info")
CASES = ("step", "throughput", "quality_topk", "quality_jumprelu", "scale")
PEER = "sae_lens.training.sae_trainer.SAETrainer (step seam of fit())"
NO_TRAINER = ("sparsekern.training is not importable in this tree (the trainer lands on the `train` "
              "branch); run with it on PYTHONPATH")


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


# ---- the two trainers ----------------------------------------------------------------------
ARCH_EXTRAS = {  # hyper-parameters set on both sides (when sparsekern's config has the field)
    "topk": dict(),
    "jumprelu": dict(l0_coefficient=1e-3, jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05),
}


def _field_names(obj_or_cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(obj_or_cls)} if dataclasses.is_dataclass(obj_or_cls) else set()


def sk_trainer(arch: str, d_in: int, d_sae: int, k: int, batch: int, lr: float, seed: int,
               device: torch.device, dtype: torch.dtype, total_steps: int = 0):
    """(sparsekern SAETrainer, names of requested extras its config lacks)."""
    from ..training import SAETrainer, TrainingConfig  # the `train` branch

    kw = dict(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, lr=lr, train_batch_size_tokens=batch,
              seed=seed, device=str(device), dtype=str(dtype).removeprefix("torch."))
    names = _field_names(TrainingConfig)
    if total_steps and "training_tokens" in names:  # the lr schedule's length, as SAELens's
        kw["training_tokens"] = total_steps * batch
    if "checkpoint_path" in names:
        kw["checkpoint_path"] = None
    missing = []
    for key, v in ARCH_EXTRAS[arch].items():
        if not names or key in names:
            kw[key] = v
        else:
            missing.append(key)
    torch.manual_seed(seed)
    return SAETrainer(TrainingConfig(**kw)), missing


def _sl_classes(arch: str):
    import sae_lens

    if arch == "topk":
        return sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig
    if arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig
    raise ValueError(f"no SAELens peer for architecture {arch!r} in this benchmark")


def _sl_sae(arch: str, d_in: int, d_sae: int, k: int, device: torch.device, dtype: torch.dtype,
            sk_cfg: Any, aligned: list[str]):
    cls, cfg_cls = _sl_classes(arch)
    kw: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, dtype=str(dtype).removeprefix("torch."),
                              device=str(device))
    if arch == "topk":
        kw["k"] = k
    for key, v in ARCH_EXTRAS[arch].items():
        kw[key] = v
    sk_names = _field_names(sk_cfg)
    own = {"d_in", "d_sae", "dtype", "device", "k", "metadata"}
    for key in sorted(_field_names(cfg_cls) & sk_names - own):
        if getattr(sk_cfg, key) is not None:  # None: "the default", resolved by each library
            kw[key] = getattr(sk_cfg, key)
            aligned.append(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(cfg_cls(**kw))


def copy_params(src: torch.nn.Module, dst: torch.nn.Module) -> list[str]:
    """Copy ``src``'s parameters into ``dst`` by SAELens name (``log_threshold`` -> ``threshold`` by exp).
    Returns the names copied; raises when a parameter of ``dst`` has no source."""
    s = dict(src.named_parameters())
    done = []
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name in s:
                v = s[name]
            elif name == "threshold" and "log_threshold" in s:
                v = s["log_threshold"].exp()
            elif name == "log_threshold" and "threshold" in s:
                v = s["threshold"].clamp_min(1e-30).log()
            else:
                raise KeyError(f"sparsekern's training SAE has no parameter for SAELens's {name!r} "
                               f"(it has {sorted(s)})")
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"{name}: sparsekern {tuple(v.shape)} vs SAELens {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))
            done.append(name)
    return done


class SLStepper:
    """SAELens's ``SAETrainer`` stepped as its ``fit()`` does, minus logging/checkpoints."""

    def __init__(self, sae: torch.nn.Module, sk_cfg: Any, batch: int, total_steps: int, lr: float,
                 device: torch.device, aligned: list[str]):
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        kw: dict[str, Any] = dict(total_training_samples=total_steps * batch, train_batch_size_samples=batch,
                                  lr=lr, device=str(device))
        skip = set(kw) | {"logger", "checkpoint_path", "n_checkpoints", "save_final_checkpoint"}
        for key in sorted(_field_names(SAETrainerConfig) & _field_names(sk_cfg) - skip):
            if getattr(sk_cfg, key) is not None:
                kw[key] = getattr(sk_cfg, key)
                aligned.append(key)
        if kw.get("lr_end") is None:
            kw["lr_end"] = kw["lr"] / 10  # LanguageModelSAERunnerConfig.__post_init__'s default
        self.trainer = SAETrainer(SAETrainerConfig(**kw), sae, data_provider=iter(()))
        self.sae = sae

    def step(self, x: Tensor) -> Any:
        tr = self.trainer
        tr.maybe_reset_sparsity()
        out = tr.step(x)
        tr.n_training_steps += 1
        return out


def _pair(arch: str, d_in: int, d_sae: int, k: int, batch: int, total_steps: int, seed: int,
          device: torch.device, dtype: torch.dtype, lr: float = 3e-4):
    sk, missing = sk_trainer(arch, d_in, d_sae, k, batch, lr, seed, device, dtype, total_steps)
    aligned: list[str] = []
    sl_sae = _sl_sae(arch, d_in, d_sae, k, device, dtype, sk.cfg, aligned)
    copied = copy_params(sk.sae, sl_sae)
    sl = SLStepper(sl_sae, sk.cfg, batch, total_steps, lr, device, aligned)
    info = dict(aligned=",".join(aligned), copied=",".join(copied))
    if missing:
        info["not_in_sk_config"] = ",".join(missing)
    return sk, sl, info


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
    sk, sl, info = _pair("topk", d_in, d_sae, k, B, total, seed, dev, dtype, sz["lr"])
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
    sk, sl, info = _pair(arch, d_in, d_sae, k, B, n, seed, dev, dtype, sz["lr"])
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
    evaluator = _sl_sae(arch, d_in, d_sae, k, dev, dtype, sk.cfg, [])
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
    if dev.type != "cpu":
        return None
    try:
        return round(T._status_kib("VmHWM") / 1024, 1)
    except (OSError, KeyError, ValueError):
        return None


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
    from .. import backends

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


# ---- driver --------------------------------------------------------------------------------
def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "shape", "dtype", "steps", "sk tok/s|ms", "peer tok/s|ms", "sk/peer", "sk MSE",
            "peer MSE", "dMSE", "sk EV", "peer EV", "dEV", "sk MiB", "peer MiB", "target", "met")

    def f(r: dict[str, Any], key: str, spec: str) -> str:
        v = r.get(key)
        return "-" if v is None or isinstance(v, str) else format(v, spec)

    lines = [(r["case"], r.get("shape", ""), r.get("dtype", ""), str(r.get("steps", "")),
              f(r, "sk_tok_s", ".0f") if r.get("sk_ms") is None else f(r, "sk_ms", ".2f") + " ms",
              f(r, "peer_tok_s", ".0f") if r.get("peer_ms") is None else f(r, "peer_ms", ".2f") + " ms",
              f(r, "speedup", ".2f") + ("x" if r.get("speedup") else ""),
              f(r, "sk_mse", ".4g"), f(r, "peer_mse", ".4g"), f(r, "mse_rel_diff", ".2%"),
              f(r, "sk_ev", ".4f"), f(r, "peer_ev", ".4f"), f(r, "ev_rel_diff", ".2%"),
              f(r, "sk_peak_mib", ".0f"), f(r, "peer_peak_mib", ".0f"), r.get("target", ""),
              {True: "yes", False: "NO", None: "-"}[r.get("target_met")] if r["status"] == "ok" else "ERROR")
             for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *lines])


def main(quick: bool, device: torch.device, out_dir: str, progress: bool, seed: int = 0,
         dtype: torch.dtype = torch.float32, cases: Optional[list[str]] = None) -> int:
    """Run the training benchmark, print a table, write JSON/CSV; 0 ok, 1 on an error."""
    t0 = time.perf_counter()
    meta: dict[str, Any] = {"schema": 1, "suite": "training-quick" if quick else "training",
                            "machine": report.machine_info(device),
                            "settings": {"seed": seed, "dtype": str(dtype).removeprefix("torch.")},
                            "peer": PEER}
    busy = report.busy_warning(report.cpu_cores()) if device.type == "cpu" else None
    if busy:
        meta["warning"] = busy
        print(busy)
    sz = sizes(quick)
    runners = {"throughput": lambda: throughput_case(sz, seed, device, dtype, progress),
               "step": lambda: step_case(sz, seed, device, dtype),
               "quality_topk": lambda: quality_case("topk", sz, seed, device, dtype, progress),
               "quality_jumprelu": lambda: quality_case("jumprelu", sz, seed, device, dtype, progress),
               "scale": lambda: scale_case(sz, seed, device, dtype)}
    rows = []
    for name in cases or CASES:
        try:
            rows.append(runners[name]())
        except ImportError as e:
            note = NO_TRAINER if "training" in str(e) else f"ImportError: {e}"
            rows.append(dict(case=name, status="error", note=note))
        except Exception as e:  # report, keep going
            where = traceback.extract_tb(e.__traceback__)[-1]
            rows.append(dict(case=name, status="error", note=f"{type(e).__name__}: {e}",
                             info=dict(at=f"{where.filename}:{where.lineno}")))
        if progress:
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 2)
    meta["loadavg_after"] = report.load_average()
    paths = report.write_results(rows, meta, out_dir, FIELDS, quick, suite="training")
    m = meta["machine"]
    print(f"sparsekern bench --training ({meta['suite']}) on {m.get('gpu') or m['cpu_model']}, "
          f"{m['cpu_cores']} cores, {torch.get_num_threads()} threads, torch {m['torch']}; "
          f"load average before {m['loadavg']}, after {meta['loadavg_after']}")
    print(f"peer: {PEER}; same activations, same initial weights, same steps")
    print(format_table(rows))
    for r in rows:
        if r.get("note"):
            print(f"  {r['case']}: {r['note']}")
    if quick:
        print("quick shapes: targets are informational (they are set for the full-size shapes)")
    print(f"total {meta['elapsed_s']:.1f} s; {report.wrote_line(paths)}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
