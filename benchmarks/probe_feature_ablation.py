"""Timing probe (not a test) for ``sparsekern.patching.feature_ablation.ablate_features``.

GPT-2-small-shaped random model (12 layers, d_model 768, d_vocab 50257, as ``sparsekern.bench.patching``),
one 15-token prompt, a JumpReLU SAE at ``blocks.6.hook_resid_pre`` with exactly 32 features active at
every position, ``per_position=True`` (32 x 15 = 480 ablations), last-position logit difference.
Baseline: one ``model.run_with_hooks`` per ablation (a hook subtracting ``a_f * W_dec[f]`` at one
position), timed on a few ablations and scaled. Also checks those ablations agree to 1e-5.

``PYTHONPATH=. python benchmarks/probe_feature_ablation.py [--sample 8] [--metric last|all]`` (~1 min on 2
cores; indicative only on a shared machine).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import sparsekern as sk
from sparsekern.patching.feature_ablation import ablate_features

N_ACTIVE, T, HOOK = 32, 15, "blocks.6.hook_resid_pre"


def build(seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=32,
        act_fn="gelu_new", normalization_type="LN", seed=seed,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg).eval()
    sae_cfg = sk.JumpReLUSAEConfig(d_in=768, d_sae=4096)
    sae_cfg.metadata.hook_name = HOOK
    sae = sk.JumpReLUSAE(sae_cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(768, 4096, generator=g) * 0.01)
        sae.W_dec.copy_(torch.randn(4096, 768, generator=g) * 0.05)
        sae.b_enc.fill_(-10.0)
        sae.b_enc[:N_ACTIVE] = 10.0  # these features fire at every position, the others never
    tokens = torch.randint(0, cfg.d_vocab, (1, T), generator=g)
    return model, sae.eval(), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=8, help="hooked forwards timed for the baseline")
    ap.add_argument("--metric", choices=("last", "all"), default="last")
    args = ap.parse_args()
    model, sae, tokens = build()

    def metric(logits):
        if args.metric == "all":
            return logits.log_softmax(-1)[..., 3].mean()
        return logits[:, -1, 3] - logits[:, -1, 7]

    t0 = time.perf_counter()
    res = ablate_features(model, tokens, sae, metric, per_position=True, progress=False)
    t_sk = time.perf_counter() - t0
    n = int(res.active.sum())
    assert n == N_ACTIVE * T, n

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        code = sae.encode(cache[HOOK])
        base = metric(model(tokens))
    cells = res.active.nonzero().tolist()
    g = torch.Generator().manual_seed(0)
    picks = [cells[i] for i in torch.randperm(len(cells), generator=g)[: args.sample].tolist()]
    err = 0.0
    t0 = time.perf_counter()
    for row, p in picks:
        f = int(res.feature_ids[row])

        def hook(act, hook=None, f=f, p=p):
            act = act.clone()
            act[:, p] = act[:, p] - code[:, p, f, None] * sae.W_dec[f]
            return act

        with torch.no_grad():
            val = metric(model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook)])) - base
        err = max(err, float((val - res.values[row, p]).abs()))
    t_ref = (time.perf_counter() - t0) / len(picks) * n
    print(
        f"{n} ablations ({N_ACTIVE} features x {T} positions, {HOOK}, metric={args.metric}): "
        f"sparsekern {t_sk:.2f} s, one hooked forward per ablation {t_ref:.1f} s (est. from {len(picks)}) "
        f"-> {t_ref / t_sk:.1f}x; max |diff| on the sampled ablations {err:.2g}"
    )


if __name__ == "__main__":
    main()
