"""Public seams of the SAE family and HookedSAETransformer that patching/ and features/ read instead of
private attributes: ``SAE.is_transcoder``, ``SAE.code_scale()``, ``SAE.norm_state`` / ``pop_norm_state()``,
``HookedSAETransformer.attached_hooks`` / ``sae_wrappers``."""

import torch
from transformer_lens import HookedTransformerConfig

import sparsekern as sk

D = 16


def _sae(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(d_in=D, d_sae=32, **kw))


def test_is_transcoder_and_code_scale():
    sae = _sae(sk.StandardSAE, sk.StandardSAEConfig)
    tc = _sae(sk.Transcoder, sk.TranscoderConfig, d_out=D)
    assert sae.is_transcoder is False and tc.is_transcoder is True
    assert sae.code_scale() is None
    topk = _sae(sk.TopKSAE, sk.TopKSAEConfig, k=4, rescale_acts_by_decoder_norm=True)
    torch.testing.assert_close(topk.code_scale(), 1 / topk.W_dec.norm(dim=-1), rtol=0, atol=0)
    assert _sae(sk.TopKSAE, sk.TopKSAEConfig, k=4).code_scale() is None


@torch.no_grad()
def test_norm_state_is_what_decode_undoes_and_pop_drops_it():
    sae = _sae(sk.StandardSAE, sk.StandardSAEConfig, normalize_activations="constant_norm_rescale")
    x = torch.randn(5, D)
    assert sae.norm_state is None
    code = sae.encode(x)
    kind, coeff = sae.norm_state
    assert kind == "scale"
    torch.testing.assert_close(coeff, D**0.5 / x.norm(dim=-1, keepdim=True), rtol=0, atol=0)
    assert sae.pop_norm_state()[1] is coeff and sae.norm_state is None
    try:
        sae.decode(code)
    except RuntimeError as e:  # the statistics were dropped: decode says so instead of returning garbage
        assert "encode() first" in str(e)
    else:
        raise AssertionError("decode without the popped statistics should refuse")


def test_attached_hooks_and_wrappers():
    cfg = HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=8, d_head=4, n_heads=4, d_mlp=32, d_vocab=20,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = sk.HookedSAETransformer(cfg)
    assert model.attached_hooks == {} and model.sae_wrappers == {}
    sae = _sae(sk.StandardSAE, sk.StandardSAEConfig)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    tc = _sae(sk.Transcoder, sk.TranscoderConfig, d_out=D)
    tc.cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
    tc.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    model.add_sae(sae)
    model.add_sae(tc)
    assert model.attached_hooks == {
        "blocks.0.hook_resid_pre": "blocks.0.hook_resid_pre",
        "blocks.1.ln2.hook_normalized": "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out": "blocks.1.ln2.hook_normalized",
    }
    wrappers = model.sae_wrappers
    assert set(wrappers) == {"blocks.0.hook_resid_pre", "blocks.1.ln2.hook_normalized"}
    assert wrappers["blocks.0.hook_resid_pre"].original is sae
    model.reset_saes()
    assert model.attached_hooks == {}


def _private_methods(cls) -> set[str]:
    return {k for k in vars(cls) if k.startswith("_") and not k.startswith("__")}


def test_subclasses_outside_saes_override_only_the_subclass_api():
    """ShardedSAE (distributed/) changes the pipeline only through its documented subclass API (plus the
    public ``reconstruct``), not through any other private method of the SAE base."""
    from sparsekern.distributed.sharded_sae import ShardedSAE
    from sparsekern.saes.pipeline import SUBCLASS_API, SAEPipeline

    base = set().union(*(_private_methods(c) for c in sk.SAE.__mro__ if issubclass(c, SAEPipeline)))
    assert set(SUBCLASS_API) <= base  # every documented name is a method of the base
    overridden = _private_methods(ShardedSAE) & base
    assert overridden and overridden <= set(SUBCLASS_API), sorted(overridden - set(SUBCLASS_API))
    assert "reconstruct" in vars(ShardedSAE)


def test_forward_runs_the_public_reconstruct():
    """The override point a subclass gets for "the code is only decoded": forward goes through it."""
    calls = []

    class Counting(sk.StandardSAE):
        def reconstruct(self, x, *args, **kwargs):
            calls.append(args)
            return super().reconstruct(x, *args, **kwargs)

    sae = _sae(Counting, sk.StandardSAEConfig)
    x = torch.randn(3, D)
    with torch.no_grad():
        # the same sparse code and kernel as decode(encode_sparse(x)): bitwise equal
        torch.testing.assert_close(sae(x), sae.decode(sae.encode_sparse(x)), rtol=0, atol=0)
        sae.use_error_term = True
        sae(x)  # its value: tests/test_sae_error_term.py
    assert len(calls) == 2 and calls[0][0] is None and calls[1][0] is x  # error_target: None, then x
