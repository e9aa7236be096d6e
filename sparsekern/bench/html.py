"""A self-contained HTML page for ``sparsekern bench`` results (every suite).

``python -m sparsekern.bench.html benchmarks/results/latest-*.json`` re-renders pages from results on
disk (``<name>.html`` beside each JSON, or ``--out`` for a single input). The page embeds plotly.js, so
it opens offline: one horizontal bar chart per (device, dtype) group with the sparsekern-vs-peer ratio
of every row (> 1 means sparsekern is faster), a line at 1x, a marker at each row's target where its
target string states one, and the full results table underneath.

plotly is optional (the ``report`` extra): without it :func:`write_page` prints one line and returns.
"""

from __future__ import annotations

import html as _html
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

Rows = Sequence[dict[str, Any]]
Source = Union[str, Path, dict, Rows]

# ratio keys by suite: ops/patching store "ratio" (peer time / sparsekern time), features/training
# store "speedup" (the same quantity)
_RATIO_KEYS = ("ratio", "speedup")
_AT_LEAST = re.compile(r">=\s*([0-9.]+)\s*x")  # ">= 10x faster", ">= 6x"
_AT_MOST = re.compile(r"<=\s*([0-9.]+)\s*x\s+[a-z]", re.I)  # "time <= 1.10x matmul", "<= 1.5x encode"
COLORS = {True: "#2ca02c", False: "#d62728", None: "#7f7f7f"}


def target_ratio(target: Optional[str]) -> Optional[float]:
    """The minimum peer/sparsekern ratio a row's ``target`` string asks for (None when it states none).

    ``">= 10x faster"`` -> 10; ``"no slower"`` -> 1; ``"time <= 1.10x matmul"`` -> 1/1.10 (sparsekern may
    take at most 1.1 times the peer); memory-only or informational targets -> None.
    """
    text = target or ""
    if m := _AT_LEAST.search(text):
        return float(m.group(1))
    if m := _AT_MOST.search(text):
        return 1.0 / float(m.group(1))
    if "no slower" in text:
        return 1.0
    return None


def load(source: Source) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, meta) from a JSON path, a parsed result document, or a bare list of rows."""
    if isinstance(source, (str, Path)):
        source = json.loads(Path(source).read_text())
    if isinstance(source, dict):
        return list(source.get("rows") or []), {k: v for k, v in source.items() if k != "rows"}
    return list(source), {}


def _ratio(row: dict[str, Any]) -> Optional[float]:
    for key in _RATIO_KEYS:
        v = row.get(key)
        if isinstance(v, (int, float)) and v > 0 and v == v and v != float("inf"):
            return float(v)
    return None


def _label(row: dict[str, Any]) -> str:
    name = row.get("op") or row.get("case") or "?"
    if row.get("variant"):
        name += f" {row['variant']}"
    where = row.get("shape") or row.get("model") or ""
    peer = row.get("peer")
    text = f"{name} · {where}" if where else str(name)
    return f"{text}<br>vs {peer}" if peer else text


def _group(row: dict[str, Any], meta: dict[str, Any]) -> str:
    device = row.get("device") or (meta.get("machine") or {}).get("device") or "?"
    dtype = row.get("dtype") or (meta.get("settings") or {}).get("dtype")
    return f"{device} · {dtype}" if dtype else str(device)


def _suite(meta: dict[str, Any]) -> str:
    return str(meta.get("suite") or "bench")


def groups(rows: Rows, meta: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows with a ratio, by (device, dtype) group, in first-seen order: one figure each."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if _ratio(r) is not None:
            out.setdefault(_group(r, meta), []).append(r)
    return out


def figure_titles(source: Source) -> list[str]:
    """The titles of the figures :func:`render_html` draws for these results, in page order."""
    rows, meta = load(source)
    return [f"sparsekern {_suite(meta)}: peer time / sparsekern time ({g})" for g in groups(rows, meta)]


def _figure(title: str, rows: Rows) -> Any:
    import plotly.graph_objects as go

    labels = [f"{i + 1}. {_label(r)}" for i, r in enumerate(rows)]
    ratios = [_ratio(r) for r in rows]
    met = [r.get("target_met") if r.get("target_met") in (True, False) else None for r in rows]
    fig = go.Figure()
    fig.add_trace(go.Bar(
        y=labels, x=ratios, orientation="h", name="peer / sparsekern",
        marker_color=[COLORS[m] for m in met],
        text=[f"{x:.2f}x" if x < 10 else f"{x:.1f}x" for x in ratios], textposition="outside",
        customdata=[[r.get("target") or "-", str(r.get("status") or "-")] for r in rows],
        hovertemplate="%{y}<br>ratio %{x:.3g}x<br>target: %{customdata[0]}<br>status: %{customdata[1]}"
                      "<extra></extra>",
    ))
    targets = [(target_ratio(r.get("target")), lab) for r, lab in zip(rows, labels)]
    targets = [(t, lab) for t, lab in targets if t is not None]
    if targets:
        fig.add_trace(go.Scatter(
            x=[t for t, _ in targets], y=[lab for _, lab in targets], mode="markers", name="target",
            marker=dict(symbol="line-ns-open", size=26, color="black", line=dict(width=3, color="black")),
            hovertemplate="target %{x:.3g}x<extra></extra>",
        ))
    fig.add_vline(x=1.0, line_dash="dash", line_color="black")
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name="1x (parity)",  # legend entry only
                             line=dict(dash="dash", color="black"), hoverinfo="skip"))
    lo = min([*ratios, *(t for t, _ in targets), 1.0])
    hi = max([*ratios, *(t for t, _ in targets), 1.0])
    fig.update_xaxes(type="log", title_text="peer time / sparsekern time (> 1: sparsekern faster; log)",
                     range=[_log10(lo / 1.6), _log10(hi * 2.5)])
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig.update_layout(title=dict(text=title), height=200 + 46 * len(rows), bargap=0.3,
                      margin=dict(l=20, r=40, t=90, b=60), legend=dict(orientation="h", y=1.02, x=1,
                                                                       xanchor="right", yanchor="bottom"))
    return fig


def _log10(x: float) -> float:
    import math

    return math.log10(max(x, 1e-9))


def _cell(v: Any) -> str:
    if isinstance(v, dict):
        v = " ".join(f"{k}={x}" for k, x in v.items())
    elif isinstance(v, float):
        v = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        v = ", ".join(map(str, v))
    return _html.escape("" if v is None else str(v))


def _table(rows: Rows) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in ["#", *cols])
    body = []
    for i, r in enumerate(rows):
        cls = {True: "met", False: "missed"}.get(r.get("target_met"), "")
        cells = "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols)
        body.append(f'<tr class="{cls}"><td>{i + 1}</td>{cells}</tr>')
    return (f'<div class="scroll"><table id="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _header(meta: dict[str, Any], n_rows: int) -> str:
    m = meta.get("machine") or {}
    where = m.get("gpu") or f"{m.get('cpu_model', '?')} ({m.get('cpu_cores', '?')} cores)"
    facts = [("suite", _suite(meta)), ("machine", where), ("device", m.get("device")),
             ("date", m.get("date")), ("torch", m.get("torch")), ("sparsekern", m.get("sparsekern")),
             ("backends", m.get("sparsekern_backends")), ("sae_lens", m.get("sae_lens")),
             ("elapsed", f"{meta['elapsed_s']} s" if "elapsed_s" in meta else None), ("rows", n_rows)]
    items = "".join(f"<li><b>{k}</b>: {_cell(v)}</li>" for k, v in facts if v not in (None, ""))
    warn = f'<p class="warning">{_cell(meta["warning"])}</p>' if meta.get("warning") else ""
    return f"<ul class=\"meta\">{items}</ul>{warn}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } ul.meta { columns: 2; list-style: none; padding: 0; font-size: 13px; }
.warning { color: #a15c00; font-size: 13px; }
.sk-fig { border: 1px solid #ddd; margin: 16px 0; padding: 4px; }
div.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } tr.met td:first-child { background: #dff0d8; }
tr.missed td:first-child { background: #f2dede; }
"""


def render_html(source: Source, out_path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Write the self-contained page for a result JSON (path or document) or a list of rows."""
    import plotly.io as pio

    rows, meta = load(source)
    title = title or f"sparsekern bench: {_suite(meta)}"
    figs = []
    titles = figure_titles({**meta, "rows": rows})
    for i, (fig_title, grows) in enumerate(zip(titles, groups(rows, meta).values())):
        div = pio.to_html(_figure(fig_title, grows), full_html=False, include_plotlyjs=(i == 0),
                          config={"displaylogo": False}, div_id=f"sk-plot-{i}")
        figs.append(f'<div class="sk-fig" id="sk-fig-{i}" data-title="{_html.escape(fig_title)}">{div}</div>')
    if not figs:
        figs.append('<p class="nofig">No row has a ratio (nothing was compared against a peer).</p>')
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{_html.escape(title)}</h1>\n"
            f"{_header(meta, len(rows))}\n"
            "<p>Bars: peer time / sparsekern time per row (green: target met, red: missed, grey: no "
            "target); dashed line: parity (1x); black tick: the row's target ratio.</p>\n"
            + "\n".join(figs) + f"\n<h2>Results</h2>\n{_table(rows)}\n</body></html>\n")
    out = Path(out_path)
    out.write_text(page, encoding="utf-8")
    return out


def write_page(json_path: Union[str, Path], out_path: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """Render ``<json>.html`` for the bench; never raises: prints one line and returns None instead."""
    out = Path(out_path) if out_path else Path(json_path).with_suffix(".html")
    try:
        import plotly  # noqa: F401
    except ImportError:
        print("html page skipped: plotly is not installed (pip install 'sparsekern[report]')")
        return None
    try:
        return render_html(json_path, out)
    except Exception as e:  # a broken page must never fail the benchmark
        print(f"html page skipped: {type(e).__name__}: {e}")
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sparsekern.bench.html RESULTS.json [...] [--out PAGE.html]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out" in args:
        i = args.index("--out")
        out = args[i + 1] if i + 1 < len(args) else None
        del args[i:i + 2]
    if not args or (out and len(args) != 1):
        print("usage: python -m sparsekern.bench.html RESULTS.json [...] [--out PAGE.html] "
              "(--out only with one input)", file=sys.stderr)
        return 2
    rc = 0
    for p in args:
        page = write_page(p, out)
        if page is None:
            rc = 1
        else:
            print(f"wrote {page}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
