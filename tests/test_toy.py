"""sparsekern.toy: the shipped model loads offline and fast, solves IOI, and its SAEs match REPORT.json."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("transformers")

import sparsekern.toy as toy  # noqa: E402
from sparsekern.toy import data as D  # noqa: E402
from sparsekern.toy import evaluate as E  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (toy.WEIGHTS_DIR / "model.safetensors").is_file(),
                                reason="toy weights not built (python scripts/train_toy.py)")


@pytest.fixture(scope="module")
def loaded():
    import transformer_lens  # noqa: F401  (import cost is not load cost)

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        t0 = time.perf_counter()
        model, saes = toy.load()
        dt = time.perf_counter() - t0
    finally:
        mp.undo()
    return model, saes, dt


def test_load_offline_fast(loaded):
    model, saes, dt = loaded
    assert dt < 3.0, f"toy.load() took {dt:.2f}s"
    assert set(saes) == {"resid_sae", "mlp0_transcoder"}
    assert not model.training
    size = sum(f.stat().st_size for f in toy.WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    assert not list(toy.WEIGHTS_DIR.rglob("*.pt")) and not list(toy.WEIGHTS_DIR.rglob("*.pkl"))


def test_model_solves_ioi(loaded):
    model, _, _ = loaded
    tok = model.tokenizer
    # task thresholds, not rounding tolerances: the model gets 152/152 pairs right with a logit
    # difference of ~9.1 on both prompt sets (fp32 rounding moves logits by ~1e-6)
    m = E.ioi_metrics(model, tok, D.ioi_prompts("test", seed=777))
    assert m["accuracy"] >= 0.9 and m["logit_diff"] > 1.0, m
    m = E.ioi_metrics(model, tok, D.ioi_prompts("test", seed=778, held_out_template=True))
    assert m["accuracy"] >= 0.9 and m["logit_diff"] > 1.0, ("held-out templates", m)
    # the same through TransformerLens's own tokenisation (to_tokens prepends BOS)
    p = D.ioi_prompts("test", n=8, seed=3)
    for q in p:
        logits = model(model.to_tokens(q.text))[0, -1]
        assert logits[model.to_single_token(" " + q.io)] > logits[model.to_single_token(" " + q.s)]


def test_tokenizer_round_trip_and_test_prompt(loaded, capsys):
    from transformer_lens import utils

    model, _, _ = loaded
    s = "When Mary and John went to the store , John gave a drink to"
    toks = model.to_tokens(s)
    assert toks[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_string(toks[0, 1:]) == s
    assert model.to_str_tokens(s)[1:] == s.split()
    utils.test_prompt(s, " Mary", model, prepend_space_to_answer=False)
    assert "Mary" in capsys.readouterr().out


def test_sae_metrics_match_report(loaded):
    model, saes, _ = loaded
    rep = toy.report()["saes"]
    tok = model.tokenizer
    import random

    rng = random.Random(2024)
    pool = D.ioi_prompts("test", seed=11)
    texts = [f"{p.text} {p.io}" for p in pool[:96]] + [D.palindrome(rng) for _ in range(48)] + [
        D.induction(rng) for _ in range(48)]
    tokens = E.encode(tok, texts, model.cfg.n_ctx)
    for name, (h_in, h_out) in {"resid_sae": ("blocks.1.hook_resid_pre", None),
                                "mlp0_transcoder": ("blocks.0.ln2.hook_normalized",
                                                    "blocks.0.hook_mlp_out")}.items():
        got = E.sae_metrics(model, saes[name], tokens, h_in, h_out, tok)
        # sampling tolerances, not rounding ones: REPORT.json was measured on another sample of prompts
        # (train_toy.py's eval mix). The explained variance here is 0.950 / 0.937 against 0.954 / 0.941
        # (|diff| ~5e-3, 10x inside 0.05; fp32 rounding of the sums is ~1e-6). L0 of a k = 16 top-k
        # code is 16 but for kept values <= 0: the bound allows 2 of them per token on average.
        assert abs(got["explained_variance"] - rep[name]["explained_variance"]) < 0.05, (name, got)
        assert abs(got["l0"] - rep[name]["l0"]) <= 0.1 * rep[name]["l0"] + 0.5, (name, got)
        assert rep[name]["explained_variance"] > 0.5


def test_bad_input(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            toy.load(device="cuda")
    d = tmp_path / "w"
    shutil.copytree(toy.WEIGHTS_DIR, d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="model.safetensors"):
        toy.load(weights_dir=d)
    shutil.copyfile(toy.WEIGHTS_DIR / "model.safetensors", d / "model.safetensors")
    (d / "model_cfg.json").write_text('{"n_layers": 2,')
    with pytest.raises(RuntimeError, match="model_cfg.json"):
        toy.load(weights_dir=d)
    shutil.copyfile(toy.WEIGHTS_DIR / "model_cfg.json", d / "model_cfg.json")
    sae_file = d / "resid_sae" / "sae_weights.safetensors"
    sae_file.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeError, match="resid_sae"):
        toy.load(weights_dir=d)


@pytest.mark.slow
def test_train_toy_quick():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy.py"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "reloaded in" in r.stdout
