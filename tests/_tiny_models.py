"""Tiny random-weight models for the drop-in tests (Dunefsky's class, SparseActs in caches, index_df):
a 2-layer TransformerLens config, integer tokens and his SparseAutoencoder with random biases."""

from __future__ import annotations

import contextlib
import warnings

import torch

D, D_SAE, VOCAB, B, T = 16, 48, 40, 2, 6


@contextlib.contextmanager
def one_thread():
    """Tiny matmuls on a shared 2-core box: one thread (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def model_cfg(**kw):
    from transformer_lens import HookedTransformerConfig

    base = dict(n_layers=2, d_model=D, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=VOCAB,
                act_fn="gelu_new", normalization_type="LN", seed=0)
    return HookedTransformerConfig(**{**base, **kw})


def hooked_sae_transformer(dtype: torch.dtype = torch.float32):
    """sparsekern's HookedSAETransformer on :func:`model_cfg`, in eval mode."""
    import sparsekern as sk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return sk.HookedSAETransformer(model_cfg(dtype=dtype)).eval()


def hooked_transformer(dtype: torch.dtype = torch.float32):
    """TransformerLens's own HookedTransformer on :func:`model_cfg`, in eval mode."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(model_cfg(dtype=dtype)).eval()


def tokens(batch: int = B, pos: int = T, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def dunefsky(transcoder: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32):
    """His SparseAutoencoder (his init) with random biases, reading blocks.0.ln2.hook_normalized
    (a transcoder to blocks.0.hook_mlp_out), or blocks.0.hook_resid_post (a plain SAE)."""
    from sparsekern.compat.transcoder_circuits import LanguageModelSAERunnerConfig, SparseAutoencoder

    torch.manual_seed(seed)
    cfg = LanguageModelSAERunnerConfig(
        d_in=D, d_sae=D_SAE, is_transcoder=transcoder, d_out=D if transcoder else None,
        hook_point="blocks.0.ln2.hook_normalized" if transcoder else "blocks.0.hook_resid_post",
        hook_point_layer=0, out_hook_point="blocks.0.hook_mlp_out" if transcoder else None,
        out_hook_point_layer=0 if transcoder else None, dtype=dtype, device="cpu",
    )
    tc = SparseAutoencoder(cfg)
    with torch.no_grad():
        for b in (tc.b_enc, tc.b_dec, tc.b_dec_out):
            if b is not None:
                b.normal_(0, 0.2)
    return tc.eval()
