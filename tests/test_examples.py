"""Every runnable example under python/ runs offline in its --quick form and prints sane numbers.

``python/tours/`` (API tours on random weights) and ``python/walkthroughs/`` (the seed notebooks on the
shipped toy model). Each script runs in a subprocess, as a user would run it, with PYTHONPATH set to the
repo and the Hugging Face libraries forced offline; the labelled numbers it prints are parsed and
checked. The walk-throughs' checks are loose (the toy model and the data are seeded, so these are far
from the measured values); the tours' checks compare with the dense or peer computation, each bound
derived beside it. The selected examples run side by side (one thread each, as many as there are
cores), since most of each run is importing torch and transformer_lens.
"""

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "python"
pytestmark = pytest.mark.slow  # ~10-20 s each (mostly imports), run side by side; still run by default
NUM = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def _example(script: str):
    """Mark a test as checking the output of ``python/<script>``."""
    def mark(fn):
        fn.example = script
        return fn
    return mark


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    # one intra-op thread: the examples' ops are too small to gain from more, and on a shared box torch's
    # spinning worker threads made the same run 5-8x slower
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(EXAMPLES / script), "--quick"]
    if script.startswith("walkthroughs/"):
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, tuple[Future, Path]]:
    """Start every example that a selected test of this module checks; {script: (future, figure dir)}."""
    scripts = [item.function.example for item in request.session.items
               if item.module is request.module and hasattr(getattr(item, "function", None), "example")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=min(4, max(2, cores)))  # <= 4: each run holds ~0.5 GiB
    started = {}
    for script in dict.fromkeys(scripts):
        out = tmp_path_factory.mktemp(Path(script).stem) / "figs"
        started[script] = (pool.submit(_run, script, out), out)
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def output(request, runs) -> str:
    """The stdout of the example the requesting test is marked with (its run must have succeeded)."""
    script = request.function.example
    future, out = runs[script]
    r = future.result()
    assert r.returncode == 0, f"{script} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    if script.startswith("walkthroughs/") and importlib.util.find_spec("plotly") is not None:
        # figures are optional: only with plotly
        assert list(out.glob(f"{Path(script).name[:3]}*.html")), f"{script} wrote no figures to {out}"
    return r.stdout


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text[-3000:]}"
    return float(m.group(1))


def test_every_example_is_checked():
    """A new example under python/ needs a test here (and a --quick form)."""
    checked = {fn.example for fn in globals().values() if callable(fn) and hasattr(fn, "example")}
    found = {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.glob("*/*.py")}
    assert found == checked, f"unchecked: {sorted(found - checked)}; missing: {sorted(checked - found)}"
    for p in EXAMPLES.glob("*/*.py"):
        assert "--quick" in p.read_text(), f"{p} takes no --quick"


def _anchors(md: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    heads = re.findall(r"^#+ (.*)$", md.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


# a path into the repo as the pages write it: `python/tours/01_x.py`, `benchmarks/results/ops-2026-*`
REPO_PATH = r"(?<![\w/.])((?:python|scripts|tests|sparsekern|benchmarks|csrc|docs)/[\w/.\-]*\w)(-?\*)?"


def test_docs_links_and_paths_resolve():
    """README, docs/ and DEVELOPERS.md: every relative link (and #anchor) and every repo path they name
    exists (a path ending in ``*`` must match a file), and the README stays a short front page."""
    pages = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 10, pages
    bad = []
    for page in pages:
        text = page.read_text()
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path) if path else page
            if not target.exists() or (anchor and anchor not in _anchors(target)):
                bad.append(f"{page.name}: link {link}")
        for m in re.finditer(REPO_PATH, text):
            found = list(ROOT.glob(m[1] + m[2])) if m[2] else [ROOT / m[1]]
            if not found or not all(f.exists() for f in found):
                bad.append(f"{page.name}: path {m[0]}")
    assert not bad, "\n".join(bad)
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


# ---- API tours (random weights)

@_example("tours/01_sparse_sae_ops.py")
def test_tour_01_sparse_sae_ops(output):
    assert _num(rf"top-k code: .* mean L0: {NUM}", output) == 32.0
    # pre-activations are 256-term fp32 dot products of x ~ N(0, 1) with unit-norm rows (|terms| sum ~10):
    # two summation orders differ by at most 256 * 6e-8 * 10 = 1.5e-4
    assert _num(rf"top-k code vs dense torch.topk: values max \|diff\| {NUM}", output) <= 2e-4
    # decode: 32 terms |value| <= ~5 times |W_dec| <= ~0.25 (sum <= ~40): 32 * 6e-8 * 40 = 8e-5
    assert _num(rf"sparse_decode vs dense code @ W_dec: max \|diff\| {NUM}", output) <= 1e-4
    assert _num(rf"JumpReLU values vs dense pre at their features: max \|diff\| {NUM}", output) <= 2e-4
    assert "every kept value > threshold: True" in output
    m = re.search(rf"sparse code memory: {NUM} MiB vs dense {NUM} MiB", output)
    assert m and float(m[1]) < float(m[2]) / 10, output[-3000:]


@_example("tours/02_activation_patching.py")
def test_tour_02_activation_patching(output):
    assert "resid_pre [layer, pos] (2, 8)" in output
    # the bound the patching tests use against TransformerLens (tests/test_patching*.py): logit
    # differences of a 2-layer fp32 model (|logits| ~10) computed in other batches, ~10 * 6e-8 per op
    assert _num(rf"max \|diff\| vs transformer_lens.patching: {NUM}", output) <= 1e-5
    assert _num(rf"index_df values vs the grid's: max \|diff\| {NUM}", output) <= 1e-5
    assert "heads by position for z, q, k, v, pattern (5, 2, 8, 4)" in output


@_example("tours/03_hooked_sae_transformer.py")
def test_tour_03_hooked_sae_transformer(output):
    # recon + (x - recon) is x up to one rounding of |x| (eps 6e-8 relative); through <= 2 blocks and the
    # unembed to logits of ~10 that is ~1e-6 (1e-4 leaves 100x for LayerNorm's amplification)
    assert _num(rf"max \|logit change\| with the SAE \+ error term \(should be ~0\): {NUM}", output) < 1e-4
    m = re.search(rf"; {NUM} MiB instead of {NUM} MiB dense", output)
    assert m and float(m[1]) < float(m[2]) / 10, output[-3000:]
    m = re.search(rf"loss {NUM} -> {NUM} after ablating feature \d+", output)
    assert m and 0 < float(m[1]) < 20 and 0 < float(m[2]) < 20, output[-3000:]


@_example("tours/04_top_activating_examples.py")
def test_tour_04_top_activating_examples(output):
    assert _num(rf"; {NUM} of 1024 features fired", output) > 0
    assert re.search(r"feature \d+: its strongest examples.*\n +\d+\.\d+ +seq +\d+ pos +\d+", output), output
    assert "same state from the explicit loop: ok" in output


@_example("tours/05_feature_analysis.py")
def test_tour_05_feature_analysis(output):
    assert _num(rf"{NUM} of 1024 features fired", output) > 0
    assert "merged halves == one pass; saved: FeatureStats(" in output
    assert _num(rf"{NUM} ablations; largest effect", output) > 0
    # the bound tests/test_feature_ablation.py holds the fused engine to against hooked forwards
    assert _num(rf"fused ablations vs one hooked forward each: max \|diff\| {NUM}", output) <= 1e-5


@_example("tours/06_train_sae.py")
def test_tour_06_train_sae(output):
    # 32 steps on a random model's activations: a TopK SAE at k 16 explains most of them (0.70 measured;
    # its tied random init is near 0), so this fails when training stops learning
    assert _num(rf"held-out: MSE/token {NUM}", output) > 0
    assert _num(rf"explained variance {NUM}", output) > 0.5
    # the script itself asserts < 1e-4 (fp32 reconstructions of the same weights by two libraries)
    assert _num(rf"max \|difference\| of the reconstructions {NUM}", output) < 1e-4
    assert "same active features: True" in output


@_example("tours/07_distributed_data_parallel.py")
def test_tour_07_distributed_data_parallel(output):
    assert "2 ranks; top-k bitwise equal to one process: True" in output
    assert "patching equal: True" in output
    assert _num(rf"feature stats over {NUM} tokens", output) == 32 * 32
    # the bound tests/test_distributed_data_parallel.py holds DDP training to (two-rank all-reduce of fp32
    # gradients vs one sum: rounding only)
    assert _num(rf"W_dec vs one process on the whole batches: max \|diff\| {NUM}", output) <= 1e-6


# ---- research walk-throughs (the seed notebooks on the shipped toy model)

@_example("walkthroughs/01_palindrome_circuit.py")
def test_walkthrough_01_palindrome_circuit(output):
    out = output
    assert _num(rf"palindrome token accuracy: {NUM}", out) >= 0.9
    assert _num(rf"logit diff clean {NUM}", out) > 1.0
    # the corrupted digit's own position carries all of the information into layer 0
    assert _num(rf"layer 0: the information sits at position 2 \({NUM} restored\)", out) > 0.9
    assert _num(rf"exact vs attribution patching: correlation {NUM}", out) > 0.5


@_example("walkthroughs/02_ioi_patching.py")
def test_walkthrough_02_ioi_patching(output):
    out = output
    assert _num(rf"IOI accuracy: {NUM}", out) >= 0.9
    assert _num(rf"IOI held-out templates: accuracy {NUM}", out) >= 0.9
    assert _num(rf"logit diff clean {NUM}", out) > 1.0
    assert _num(rf"corrupted {NUM}", out) < 0.0  # S2 := IO flips the answer
    assert _num(rf"patching correlation \(resid_pre\): {NUM}", out) > 0.8
    # DLA is complete: the components plus the bias terms add up to the logit difference
    m = re.search(rf"sum of components {NUM} \+ biases {NUM} = logit diff {NUM}", out)
    assert m and abs(float(m[1]) + float(m[2]) - float(m[3])) < 0.05, out[-3000:]
    assert _num(rf"attn_head_out_by_pos +correlation exact vs attribution: {NUM}", out) > 0.5


@_example("walkthroughs/03_sae_features.py")
def test_walkthrough_03_sae_features(output):
    out = output
    assert _num(rf"max \|logit change\| with the error term: {NUM}", out) < 1e-3
    assert _num(rf"IOI accuracy with SAE spliced: {NUM}", out) >= 0.9
    assert _num(rf"alive features: {NUM} of 1024", out) > 256
    assert re.search(r"feature \d+ \(fires on [\d.]+% of tokens\):\n +\d+\.\d+ ", out), out[-3000:]
    assert _num(rf"baseline logit diff {NUM}", out) > 1.0


@_example("walkthroughs/04_transcoder_feature_stats.py")
def test_walkthrough_04_transcoder_feature_stats(output):
    out = output
    l0 = _num(rf"L0 {NUM} \(k = 16\)", out)
    assert 0 < l0 <= 16
    assert _num(rf"alive features {NUM} of 1024", out) > 256
    assert _num(rf"pairs co-firing >= \d+ times: {NUM}", out) > 0
    # a feature's decoder row points along the MLP output seen while it fires
    assert _num(rf"cos\(mean MLP output given f - overall mean, W_dec\[f\]\) over \d+ features: median {NUM}",
                out) > 0.2
