"""AtP* QK fix: exact softmax for query/key patches, linear from the attention pattern onward.

Plain attribution patching linearises the metric in ``q``/``k`` straight through the attention
softmax, which fails when attention is saturated (the gradient of a saturated softmax is ~0 even when
a patch would flip which position is attended). Kramar et al. 2024 (AtP*) instead recompute the
pattern exactly with the patched ``q`` or ``k`` and only linearise from the pattern onward::

    estimate = sum((pattern_patched - pattern_corrupted) * d metric / d pattern)

A query patch at position ``t`` changes row ``t`` of the pattern only; a key patch at position
``s`` changes column ``s`` of the scores, hence every row through its normaliser. Both have closed
forms computed here for all positions and heads at once (float64).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Float

Scores = Float[torch.Tensor, "batch head dest src"]


def attention_scores(
    attn: Any,
    q: Float[torch.Tensor, "batch pos head d_head"],
    k: Float[torch.Tensor, "batch pos kv_head d_head"],
    masked: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
) -> Scores:
    """``hook_attn_scores`` of ``attn`` recomputed from ``hook_q``/``hook_k`` values (float64).

    Mirrors ``AbstractAttention.forward`` between ``hook_q``/``hook_k`` and ``hook_attn_scores``
    through the module's own methods (qk-norm, clip, rotary, log-n scaling, scale, soft cap, GQA,
    ALiBi); ``masked`` ([batch or 1, head or 1, dest, src] bool) marks the entries the corrupted run
    masked, which are set to ``attn.IGNORE``.
    """
    cfg = attn.cfg
    if getattr(cfg, "original_architecture", None) in (
        "OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM",
    ) or getattr(cfg, "use_attention_sinks", False) or (
        cfg.positional_embedding_type == "relative_positional_bias"
    ):
        raise NotImplementedError(
            "qk_fix=True does not support this attention variant (OLMo qk-norm, attention sinks or "
            "relative positional bias); use qk_fix=False"
        )
    with torch.no_grad():  # qk-norm weights may require grad; no graph is needed here
        return _scores(attn, cfg, q.double(), k.double(), masked, attention_mask)


def _scores(attn, cfg, q, k, masked, attention_mask) -> Scores:
    if getattr(cfg, "use_qk_norm", False) and hasattr(attn, "_apply_qk_norm"):
        q = attn._apply_qk_norm(q, attn.q_norm).double()
        k = attn._apply_qk_norm(k, attn.k_norm).double()
    if getattr(cfg, "clip_qkv", None) is not None:
        q = q.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        k = k.clamp(-cfg.clip_qkv, cfg.clip_qkv)
    if cfg.positional_embedding_type == "rotary":
        q = attn.apply_rotary(q, 0, attention_mask).double()
        k = attn.apply_rotary(k, 0, attention_mask).double()
    if getattr(cfg, "use_logn_attn", False) and not attn.training:
        q = attn._apply_logn_scaling(q, 0).double()
    scores = attn.calculate_attention_scores(q, k).double()
    if cfg.positional_embedding_type == "alibi":
        scores = scores + attn.alibi[:, -scores.size(-2):, : scores.size(-1)].double()
    ignore = attn.IGNORE.to(device=scores.device, dtype=scores.dtype)
    return torch.where(masked, ignore, scores)


def _group_heads(est: torch.Tensor, n_groups: int, dim: int) -> torch.Tensor:
    """Sum query heads (axis ``dim``) into their kv group (TL uses ``repeat_interleave``)."""
    n = est.shape[dim]
    if n_groups == n:
        return est
    shape = list(est.shape)
    shape[dim : dim + 1] = [n_groups, n // n_groups]
    return est.reshape(shape).sum(dim + 1)


def _softmax(a: Scores) -> Scores:
    p = torch.softmax(a, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # fully masked rows: TL sets NaN to 0 too


def q_rows_delta(
    a_corr: Scores, a_qclean: Scores, grad_pattern: Scores
) -> Float[torch.Tensor, "batch head dest"]:
    """Per (batch, head, dest) estimate of patching the query at ``dest`` (row ``dest`` changes)."""
    return ((_softmax(a_qclean) - _softmax(a_corr)) * grad_pattern).sum(-1)


def k_all_delta(
    a_corr: Scores, a_kclean: Scores, grad_pattern: Scores
) -> Float[torch.Tensor, "batch head"]:
    """Estimate of patching the key of every position of a head (all score columns change)."""
    return ((_softmax(a_kclean) - _softmax(a_corr)) * grad_pattern).sum((-1, -2))


def _exclusive(x: torch.Tensor, op: str) -> torch.Tensor:
    """For each last-axis index s: reduction (``"lse"`` or ``"sum"``) over all other indices."""
    if op == "lse":
        pre, suf = torch.logcumsumexp(x, -1), torch.logcumsumexp(x.flip(-1), -1).flip(-1)
        pad = torch.full_like(x[..., :1], -torch.inf)
        combine = torch.logaddexp
    else:
        pre, suf = x.cumsum(-1), x.flip(-1).cumsum(-1).flip(-1)
        pad = torch.zeros_like(x[..., :1])
        combine = torch.add
    left = torch.cat([pad, pre[..., :-1]], -1)
    right = torch.cat([suf[..., 1:], pad], -1)
    return combine(left, right)


def k_cols_delta(
    a_corr: Scores, a_kclean: Scores, grad_pattern: Scores
) -> Float[torch.Tensor, "batch head src"]:
    """Per (batch, head, src) estimate of patching only the key at ``src``.

    For row t, only score ``a[t, s]`` changes to ``a'[t, s]``: with ``Z_{-s}`` the normaliser
    without entry s (exclusive logsumexp, no cancellation when ``p_s ~ 1``),
    ``Z' = Z_{-s} + exp(a'_s)``, other entries scale by ``Z / Z'``. Summed over dest rows.
    """
    neg_inf = torch.isneginf(a_corr) & torch.isneginf(a_kclean)
    log_z = torch.logsumexp(a_corr, -1, keepdim=True)
    log_z_new = torch.logaddexp(_exclusive(a_corr, "lse"), a_kclean)
    p = torch.exp(a_corr - log_z)
    others = _exclusive(p * grad_pattern, "sum")  # sum_{s' != s} p_s' g_s'
    est = torch.expm1(log_z - log_z_new) * others + (torch.exp(a_kclean - log_z_new) - p) * grad_pattern
    est = torch.where(neg_inf, torch.zeros_like(est), est)  # masked both ways: no change
    return torch.nan_to_num(est, nan=0.0).sum(-2)


def check_scores(recomputed: Scores, cached: torch.Tensor, masked: torch.Tensor, layer: int) -> None:
    """Refuse to run the QK fix when our score recomputation does not match the model's."""
    r = torch.where(masked, torch.zeros_like(recomputed), recomputed)
    c = torch.where(masked, torch.zeros_like(recomputed), cached.double())
    err = float((r - c).abs().max()) if r.numel() else 0.0
    scale = float(c.abs().max()) if c.numel() else 0.0
    if err > 1e-4 * (1.0 + scale):
        raise NotImplementedError(
            f"qk_fix=True: could not reproduce blocks.{layer}.attn.hook_attn_scores from hook_q/hook_k "
            f"for this architecture (max abs error {err:.3g}); use qk_fix=False"
        )


__all__ = ["attention_scores", "q_rows_delta", "k_all_delta", "k_cols_delta", "check_scores"]
