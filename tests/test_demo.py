"""``sparsekern demo --quick`` end to end: its numbers, its report as Chromium draws it, its PNGs, bad input.

One quick run (module fixture, through the CLI) feeds every test. The numbers are checked for what they
claim: sparsekern.patching equals transformer_lens.patching (computed in the same run), the fused feature
ablation equals hooked forwards, the toy model solves IOI. The report is rendered by headless Chromium:
every figure's plotly SVG and title, no JavaScript error; its screenshot is saved beside the report (and to
``benchmarks/results/demo-report.png`` with ``SPARSEKERN_SAVE_SCREENSHOT=1``).
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import io
import json
import re
import struct

import pytest
from _browser import js_errors, render

from sparsekern import cli
from sparsekern.demo import report

pytestmark = pytest.mark.skipif(importlib.util.find_spec("plotly") is None,
                                reason="plotly is not installed (pip install 'sparsekern[report]')")

# Tolerances. Every number is an fp32 evaluation of the shipped toy model (2 layers, d_model 128). Its
# conditioning, measured once against the same model in float64 on an IOI batch: every logit within 1e-5
# (of logits up to ~20), the IOI logit difference (~9.2) within 9e-7. Two fp32 evaluations of the same
# quantity by different code (batched vs one by one, fused vs hooked, decomposed vs direct) differ by
# about twice that, whatever the CPU's rounding; each tolerance below states its margin over it.

# patches per function for the toy model (2 layers, 4 heads) on 15-token prompts
EXPECTED_PATCHES = {
    "get_act_patch_resid_pre": 2 * 15, "get_act_patch_attn_head_out_by_pos": 2 * 15 * 4,
    "get_act_patch_block_every": 3 * 2 * 15, "get_act_patch_attn_head_all_pos_every": 5 * 2 * 4}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--quick", "--no-progress", "--out", str(out)])
    numbers = json.loads((out / "demo.json").read_text())
    return rc, out, buf.getvalue(), numbers


def test_demo_numbers(demo):
    rc, out, stdout, n = demo
    assert rc == 0
    assert f"report: {out / report.REPORT_NAME}" in stdout and (out / report.REPORT_NAME).is_file()
    ioi = n["ioi"]
    assert ioi["accuracy"] >= 0.9 and ioi["logit_diff"] > 3 and ioi["corrupted_logit_diff"] < -3
    # DLA adds up to the logit diff: a linear re-summation of the same final residual (13 components,
    # 128-term dots), each side within ~2e-5 of exact even with every logit at its worst: 25x inside 1e-3
    assert ioi["dla_sum"] == pytest.approx(ioi["logit_diff"], abs=1e-3)
    # the lens ends at the model: the same final residual through the same ln_final and W_U
    assert ioi["lens_final"] == pytest.approx(ioi["logit_diff"], abs=1e-3)
    assert set(n["patching"]) == set(EXPECTED_PATCHES)
    for name, v in n["patching"].items():
        assert v["patches"] == EXPECTED_PATCHES[name]
        # sparsekern == TransformerLens, same run: the metric is a logit difference over ~18.5, so two
        # fp32 runs differ by <= 2 * 2e-5 / 18.5 ~ 2e-6 (worst logits): 50x inside 1e-4
        assert v["max_abs_diff"] < 1e-4, (name, v)
        assert v["speedup"] > 1.0, (name, v)
        assert f"{name}: {v['speedup']:.1f}x faster than TransformerLens" in stdout
    # method thresholds, not rounding ones: attribution patching is a first-order approximation
    # (measured r = 0.94 .. 0.999 on this model)
    corr = {k: v["correlation"] for k, v in n["attribution"].items()}
    assert corr["get_act_patch_resid_pre"] > 0.95 and min(corr.values()) > 0.5, corr
    f = n["features"]
    assert f["n_tokens"] > 1000 and 0 < f["active_on_ioi"] <= f["d_sae"] and f["dead"] < f["d_sae"]
    # fused ablation == hooked forwards: an effect is a difference of two logit differences (each within
    # 9e-7 measured), so the two differ by ~4e-6 (measured 2e-6): 25x inside 1e-4
    assert f["ablation_reference_max_diff"] < 1e-4
    assert len(f["top_ablation"]) == 6 and abs(f["top_ablation"][0][1]) > 0


def test_demo_report_renders_in_chromium(demo, tmp_path):
    _, out, _, n = demo
    page = out / report.REPORT_NAME
    text = page.read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*\bsrc=", text) is None and len(text) > 1_000_000  # plotly.js inline
    assert text.count('class="ctx"') >= 6  # highlighted top activating examples
    dom, shot = render(page, tmp_path, "demo-report.png", height=2400)
    assert (errors := js_errors(dom)) is None, f"JavaScript errors on the page: {errors}"
    starts = [m.start() for m in re.finditer(r'<div class="sk-fig" id="sk-fig-\d+"', dom)]
    titles = n["figures"]
    assert len(starts) == len(titles) == 11
    for title, chunk in zip(titles, [dom[a:b] for a, b in zip(starts, starts[1:] + [len(dom)])]):
        assert 'class="main-svg"' in chunk, f"figure {title!r} has no plotly svg"
        drawn = [html.unescape(t) for t in re.findall(r'<text class="gtitle"[^>]*>(.*?)</text>', chunk)]
        assert drawn[:1] == [title]
    (out / "demo-report-screenshot.png").write_bytes(shot.read_bytes())


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_demo_pngs(demo):
    _, out, _, n = demo
    if report.chromium() is None:
        assert n["pngs"] == []
        pytest.skip("Chromium is not installed: the demo skips its PNGs (scripts/test.sh installs it)")
    pngs = [out / p for p in n["pngs"]]
    assert len(pngs) == len(n["figures"])
    for p in pngs:
        w, h = _png_size(p)
        assert w >= 600 and h >= 300 and p.stat().st_size > 5_000, p


def test_demo_bad_out(tmp_path):
    with pytest.raises(SystemExit, match="parent folder .* does not exist"):
        cli.main(["demo", "--quick", "--out", str(tmp_path / "missing" / "report")])
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit, match="sparsekern demo: --device cuda requested"):
            cli.main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "gpu")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is not a folder"):
        cli.main(["demo", "--quick", "--out", str(tmp_path / "file")])
