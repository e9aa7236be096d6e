"""The bench HTML page, checked as a person would see it: rendered by headless Chromium.

Chromium (``--dump-dom`` executes the page's scripts) must draw every figure: each figure container
holds plotly's ``svg.main-svg``, its title and one bar per row with a ratio, and the page raises no
JavaScript error (a ``window.onerror`` handler injected before any other script writes errors into a
DOM element that the dumped DOM would show). Screenshots go to the test's tmp dir and, when
``SPARSEKERN_SAVE_SCREENSHOT`` is set, to ``benchmarks/results/``. Without Chromium these tests skip
(``scripts/test.sh`` installs it with apt where it can).
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import pytest

from _browser import js_errors, render
from sparsekern import cli
from sparsekern.bench import html as bench_html
from sparsekern.bench import report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
HAVE_PLOTLY = importlib.util.find_spec("plotly") is not None
needs_plotly = pytest.mark.skipif(not HAVE_PLOTLY,
                                  reason="plotly is not installed (pip install 'sparsekern[report]')")

def _assert_rendered(dom: str, source) -> None:
    """Every figure drew (main-svg, its title, one bar per ratio row) and no JS error was reported."""
    errors = js_errors(dom)
    assert errors is None, f"JavaScript errors on the page: {errors}"
    rows, meta = bench_html.load(source)
    titles = bench_html.figure_titles(source)
    groups = list(bench_html.groups(rows, meta).values())
    assert titles and len(titles) == len(groups)
    starts = [m.start() for m in re.finditer(r'<div class="sk-fig" id="sk-fig-\d+"', dom)]
    assert len(starts) == len(titles), f"{len(starts)} figure containers, expected {len(titles)}"
    chunks = [dom[a:b] for a, b in zip(starts, starts[1:] + [dom.find('<h2>Results</h2>')])]
    n_svg = dom.count('class="main-svg"')
    assert n_svg >= len(titles) and n_svg % len(titles) == 0, n_svg
    for title, group, chunk in zip(titles, groups, chunks):
        assert 'class="main-svg"' in chunk, f"figure {title!r} has no plotly svg"
        drawn = [html.unescape(t) for t in re.findall(r'<text class="gtitle"[^>]*>(.*?)</text>', chunk)]
        assert drawn == [title]
        assert chunk.count('<g class="point">') == len(group), f"bars in {title!r}"
    assert dom.count('<table id="results">') == 1
    assert dom.count("<tr class=") == len(rows)


def _synthetic() -> dict:
    ops = ("topk_encode", "sparse_decode", "sae_forward")
    rows = []
    for device, dtype in (("cpu", "float32"), ("cuda:0", "bfloat16")):
        for i, op in enumerate(ops):
            rows.append({"op": op, "variant": "", "shape": "tiny", "dtype": dtype, "device": device,
                         "peer": "dense peer", "status": "ok", "sparsekern_ms": 1.0, "peer_ms": 2.0 + i,
                         "ratio": 2.0 + i, "target": [">= 1.5x faster", "time <= 1.10x matmul", None][i],
                         "target_met": [True, True, None][i], "info": {"k": 4}, "note": "<b>escaped</b>"})
    rows.append({"op": "sparse_decode", "shape": "tiny", "dtype": "float32", "device": "cpu",
                 "peer": "broken peer", "status": "error", "ratio": None, "target_met": None})
    return {"schema": 1, "suite": "synthetic", "machine": {"device": "cpu", "cpu_model": "test cpu"},
            "elapsed_s": 1.0, "rows": rows}


def test_target_ratio_reads_the_target_strings():
    assert bench_html.target_ratio(">= 10x faster") == 10
    assert bench_html.target_ratio(">= 6x") == 6
    assert bench_html.target_ratio("no slower") == 1
    assert bench_html.target_ratio("time <= 1.10x matmul") == pytest.approx(1 / 1.1)
    assert bench_html.target_ratio("peak <= 32 MiB; time <= 1.10x matmul") == pytest.approx(1 / 1.1)
    assert bench_html.target_ratio("encode + stats <= 1.5x encode") == pytest.approx(1 / 1.5)
    for none in (None, "", "-", "peak <= 32 MiB", "informational (targets are GPU)"):
        assert bench_html.target_ratio(none) is None


def test_without_plotly_the_bench_skips_the_page(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "plotly", None)  # import plotly -> ImportError
    paths = report.write_results(_synthetic()["rows"], {"machine": {"device": "cpu", "cpu_model": "x",
                                                                    "cpu_cores": 1}},
                                 tmp_path, ["op", "ratio"], quick=True, suite="synthetic")
    assert "html" not in paths and not list(tmp_path.glob("*.html"))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["html page skipped: plotly is not installed (pip install 'sparsekern[report]')"]
    assert "(+ .csv, latest-synthetic-quick.json)" in report.wrote_line(paths)


@needs_plotly
def test_error_hook_reports_javascript_errors(tmp_path):
    """The check is not vacuous: a page that throws shows the error in the dumped DOM."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><script>throw new Error('boom');</script>"
                    "</body></html>")
    dom, _ = render(page, tmp_path, "broken.png", save=False)
    assert re.search(r'<pre id="sk-js-errors">[^<]*boom', dom)


@needs_plotly
def test_synthetic_page_renders(tmp_path):
    doc = _synthetic()
    page = bench_html.render_html(doc, tmp_path / "synthetic.html")
    text = page.read_text(encoding="utf-8")
    # plotly.js embedded (no <script src=...>, megabytes of inline script): the page opens offline
    assert re.search(r"<script[^>]*\bsrc=", text) is None and len(text) > 1_000_000
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text
    assert bench_html.figure_titles(doc) == [
        "sparsekern synthetic: peer time / sparsekern time (cpu · float32)",
        "sparsekern synthetic: peer time / sparsekern time (cuda:0 · bfloat16)"]
    dom, shot = render(page, tmp_path, "bench-synthetic.png")
    _assert_rendered(dom, doc)


@needs_plotly
@pytest.mark.slow
def test_quick_bench_writes_a_page_that_renders(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--no-progress", "--ops", "sparse_decode", "--repeats", "3",
                   "--out", str(tmp_path)])
    assert rc == 0
    (js,) = tmp_path.glob("ops-quick-*.json")
    page = js.with_suffix(".html")
    assert page.exists()
    assert ".html" in capsys.readouterr().out
    doc = json.loads(js.read_text())
    assert any(r.get("ratio") for r in doc["rows"])
    dom, _ = render(page, tmp_path, "bench-ops-quick.png")
    _assert_rendered(dom, doc)


@needs_plotly
@pytest.mark.parametrize("name", ["latest-features.json", "latest-training.json"])
def test_committed_results_rerender(tmp_path, name, capsys):
    src = RESULTS / name
    if not src.exists():
        pytest.skip(f"{src} is not committed")
    out = tmp_path / src.with_suffix(".html").name
    assert bench_html.main([str(src), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    dom, _ = render(out, tmp_path, "bench-" + src.stem.removeprefix("latest-") + ".png")
    _assert_rendered(dom, src)


def test_html_cli_usage_errors(capsys):
    assert bench_html.main([]) == 2
    assert bench_html.main(["a.json", "b.json", "--out", "x.html"]) == 2
    assert "usage" in capsys.readouterr().err
