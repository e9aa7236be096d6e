"""Measurements of the toy model (IOI, palindromes, induction) and of SAEs / transcoders on it."""

from __future__ import annotations

import random
from typing import Any, Optional

import torch

from . import data as D


def encode(tok: Any, texts: list[str], ctx: int) -> torch.Tensor:
    """``[len(texts), ctx]`` token ids: BOS + words, right-padded with PAD (truncated to ``ctx``)."""
    out = torch.full((len(texts), ctx), tok.pad_token_id, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(t.split())
        ids = ids[:ctx]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@torch.no_grad()
def ioi_metrics(model: Any, tok: Any, prompts: list) -> dict:
    """Top-1 accuracy (the IO name is the argmax over the whole vocabulary) and mean logit diff IO - S."""
    ctx = model.cfg.n_ctx
    toks = encode(tok, [p.text for p in prompts], ctx)
    last = torch.tensor([len(p.text.split()) for p in prompts])  # BOS shifts by one: index = n_words
    logits = model(toks)[torch.arange(len(prompts)), last]
    io = torch.tensor(tok.convert_tokens_to_ids([p.io for p in prompts]))
    s = torch.tensor(tok.convert_tokens_to_ids([p.s for p in prompts]))
    ar = torch.arange(len(prompts))
    diff = logits[ar, io] - logits[ar, s]
    return {"accuracy": float((logits.argmax(-1) == io).float().mean()),
            "logit_diff": float(diff.mean()), "n": len(prompts)}


@torch.no_grad()
def _second_half_accuracy(model: Any, tok: Any, texts: list[str], first_pred: int) -> dict:
    """Teacher-forced top-1 accuracy on word ``n // 2 + first_pred`` onwards (word ``j`` is predicted at
    position ``j``: position 0 is BOS). Returns per-token and whole-sequence accuracy."""
    toks = encode(tok, texts, model.cfg.n_ctx)
    pred = model(toks).argmax(-1)
    hit = tot = seq_ok = 0
    for i, t in enumerate(texts):
        n = len(t.split())
        half = n // 2
        ok = True
        for j in range(half + first_pred, n):  # predict word j (token j+1) from position j
            good = bool(pred[i, j] == toks[i, j + 1])
            hit += good
            tot += 1
            ok &= good
        seq_ok += ok
    return {"token_accuracy": hit / tot, "sequence_accuracy": seq_ok / len(texts), "n": len(texts)}


def task_metrics(model: Any, tok: Any, seed: int = 12345) -> dict:
    rng = random.Random(seed)
    return {
        "ioi_test_pairs": ioi_metrics(model, tok, D.ioi_prompts("test", seed=seed)),
        "ioi_test_pairs_held_out_template": ioi_metrics(
            model, tok, D.ioi_prompts("test", seed=seed, held_out_template=True)),
        # "a b c | c b a": the reversed digits after "|" (word index half + 1 on; "|" itself is not scored)
        "palindrome": _second_half_accuracy(model, tok, [D.palindrome(rng) for _ in range(256)], 1),
        # "a b c a b c": the first repeated word is not predictable, the rest are
        "induction": _second_half_accuracy(model, tok, [D.induction(rng) for _ in range(256)], 1),
    }


@torch.no_grad()
def sae_metrics(model: Any, sae: Any, tokens: torch.Tensor, hook_in: str, hook_out: Optional[str],
                tok: Any) -> dict:
    """Explained variance and L0 of an SAE (``hook_out`` None) or transcoder on non-special positions."""
    names = [hook_in] + ([hook_out] if hook_out else [])
    _, cache = model.run_with_cache(tokens, names_filter=names)
    keep = ~torch.isin(tokens, torch.tensor([tok.bos_token_id, tok.pad_token_id, tok.eos_token_id]))
    x = cache[hook_in][keep]
    y = cache[hook_out][keep] if hook_out else x
    sae = sae.to(torch.float32)
    y_hat = sae(x)
    ev = 1 - (y_hat - y).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
    l0 = (sae.encode(x) != 0).sum(-1).float().mean()
    return {"explained_variance": float(ev), "l0": float(l0), "n_tokens": int(x.shape[0])}
