"""The seed-notebook walk-throughs (python/001-004) run offline in their --quick form and print sane numbers.

Each script runs in a subprocess (as a user would run it) with the Hugging Face libraries forced offline;
the labelled numbers it prints are parsed and checked loosely (the toy model and the data are seeded, so
these are far from the measured values; see the report of each test on failure).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~20 s each (mostly imports); still run by default


def _run(script: str, tmp_path: Path) -> str:
    # one intra-op thread: the toy model's ops are too small to gain from more, and on a shared box torch's
    # spinning worker threads made the same run 5-8x slower
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "figs"
    r = subprocess.run([sys.executable, str(ROOT / "python" / script), "--quick", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if importlib.util.find_spec("plotly") is not None:  # figures are optional: only with plotly
        assert list(out.glob(f"{script[:3]}_*.html")), f"{script} wrote no figures to {out}"
    return r.stdout


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text[-3000:]}"
    return float(m.group(1))


NUM = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def test_001_palindrome_circuit(tmp_path):
    out = _run("001_palindrome_circuit.py", tmp_path)
    assert _num(rf"palindrome token accuracy: {NUM}", out) >= 0.9
    assert _num(rf"logit diff clean {NUM}", out) > 1.0
    # the corrupted digit's own position carries all of the information into layer 0
    assert _num(rf"layer 0: the information sits at position 2 \({NUM} restored\)", out) > 0.9
    assert _num(rf"exact vs attribution patching: correlation {NUM}", out) > 0.5


def test_002_ioi_patching(tmp_path):
    out = _run("002_ioi_patching.py", tmp_path)
    assert _num(rf"IOI accuracy: {NUM}", out) >= 0.9
    assert _num(rf"IOI held-out templates: accuracy {NUM}", out) >= 0.9
    assert _num(rf"logit diff clean {NUM}", out) > 1.0
    assert _num(rf"corrupted {NUM}", out) < 0.0  # S2 := IO flips the answer
    assert _num(rf"patching correlation \(resid_pre\): {NUM}", out) > 0.8
    # DLA is complete: the components plus the bias terms add up to the logit difference
    m = re.search(rf"sum of components {NUM} \+ biases {NUM} = logit diff {NUM}", out)
    assert m and abs(float(m[1]) + float(m[2]) - float(m[3])) < 0.05, out[-3000:]
    assert _num(rf"attn_head_out_by_pos +correlation exact vs attribution: {NUM}", out) > 0.5


def test_003_sae_features(tmp_path):
    out = _run("003_sae_features.py", tmp_path)
    assert _num(rf"max \|logit change\| with the error term: {NUM}", out) < 1e-3
    assert _num(rf"IOI accuracy with SAE spliced: {NUM}", out) >= 0.9
    assert _num(rf"alive features: {NUM} of 1024", out) > 256
    assert re.search(r"feature \d+ \(fires on [\d.]+% of tokens\):\n +\d+\.\d+ ", out), out[-3000:]
    assert _num(rf"baseline logit diff {NUM}", out) > 1.0


def test_004_transcoder_feature_stats(tmp_path):
    out = _run("004_transcoder_feature_stats.py", tmp_path)
    l0 = _num(rf"L0 {NUM} \(k = 16\)", out)
    assert 0 < l0 <= 16
    assert _num(rf"alive features {NUM} of 1024", out) > 256
    assert _num(rf"pairs co-firing >= \d+ times: {NUM}", out) > 0
    # a feature's decoder row points along the MLP output seen while it fires
    assert _num(rf"cos\(mean MLP output given f - overall mean, W_dec\[f\]\) over \d+ features: median {NUM}",
                out) > 0.2
