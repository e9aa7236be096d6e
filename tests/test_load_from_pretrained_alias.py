"""``SAE.load_from_pretrained``: SAELens's deprecated alias of ``load_from_disk``, with SAELens's warning
(same message, blamed on the caller's line) and its ``device`` / ``dtype`` arguments."""

from __future__ import annotations

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")

import sparsekern as sk  # noqa: E402

D, D_SAE = 16, 48


def test_load_from_pretrained_is_sae_lens_deprecated_alias(tmp_path):
    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=D, d_sae=D_SAE))
    sae.save_model(tmp_path)
    with pytest.warns(DeprecationWarning) as ours:
        loaded = sk.SAE.load_from_pretrained(tmp_path, device="cpu", dtype="float64")
    with pytest.warns(DeprecationWarning) as theirs:
        sae_lens.SAE.load_from_pretrained(tmp_path, device="cpu", dtype="float64")
    messages = [str(w.message) for w in ours]
    assert messages == [str(w.message) for w in theirs] == ["Use load_from_disk instead"]
    assert ours[0].filename == __file__  # blamed on the caller, as SAELens's
    assert isinstance(loaded, sk.StandardSAE) and loaded.W_dec.dtype == torch.float64
    # fp32 weights widened to float64 are exact: assert_close's float64 default (rtol 1e-7) is slack
    torch.testing.assert_close(loaded.W_dec, sae.W_dec.double())
