"""The demo's report: one self-contained HTML page (plotly.js embedded once) plus one PNG per figure.

A :class:`Section` holds a title, an introduction and an ordered list of items: plotly figures (with a
file-friendly name) and raw HTML blocks (tables, highlighted text). :func:`write_report` writes
``<out>/sparsekern-demo.html``; :func:`write_pngs` screenshots each figure with headless Chromium (the
only renderer assumed here: plotly's own PNG export needs kaleido), two at a time.
"""

from __future__ import annotations

import html as _html
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPORT_NAME = "sparsekern-demo.html"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@dataclass
class Figure:
    name: str  # file stem of its PNG, e.g. "ioi-dla"
    fig: Any  # plotly.graph_objects.Figure with a layout title

    @property
    def title(self) -> str:
        return str(self.fig.layout.title.text or self.name)

    @property
    def size(self) -> tuple[int, int]:
        return int(self.fig.layout.width or 900), int(self.fig.layout.height or 450)


@dataclass
class Section:
    title: str
    intro: str = ""  # HTML
    items: list = field(default_factory=list)  # Figure | str (HTML)

    def figure(self, name: str, fig: Any, width: int = 900, height: int = 450) -> None:
        fig.update_layout(
            width=width, height=height, template="plotly_white", margin=dict(l=70, r=30, t=70, b=60)
        )
        self.items.append(Figure(name, fig))

    def html(self, block: str) -> None:
        self.items.append(block)

    def figures(self) -> list[Figure]:
        return [i for i in self.items if isinstance(i, Figure)]


def esc(x: Any) -> str:
    return _html.escape(str(x))


def table(header: list[str], rows: list[list[Any]], raw_cols: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are escaped except the columns in ``raw_cols`` (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{c if j in raw_cols else esc(_fmt(c))}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def highlight(tokens: list[str], acts: list[float], at: int) -> str:
    """Tokens as spans shaded by activation (max of the row = full orange), ``at`` outlined."""
    top = max([a for a in acts if a > 0], default=1.0)
    spans = []
    for i, (t, a) in enumerate(zip(tokens, acts)):
        alpha = max(0.0, min(1.0, a / top)) if a > 0 else 0.0
        box = ' class="at"' if i == at else ""
        spans.append(
            f'<span{box} style="background: rgba(255,140,0,{alpha:.2f})" '
            f'title="{esc(f"{a:.3g}")}">{esc(t)}</span>'
        )
    return '<span class="ctx">' + " ".join(spans) + "</span>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 24px; } h2 { font-size: 20px; border-bottom: 1px solid #ddd; padding-top: 12px; }
.meta { font-size: 13px; color: #555; } .sk-fig { margin: 14px 0; }
nav a { margin-right: 14px; } .scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 10px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } .ctx span { padding: 1px 2px; border-radius: 3px; font-family: monospace; }
.ctx span.at { outline: 2px solid #c00; } .good { color: #1a7f37; } .bad { color: #b42318; }
"""


def write_report(sections: list[Section], out_dir: Path, title: str, meta_html: str) -> Path:
    """Write the page; figure ``i`` sits in ``<div class="sk-fig" id="sk-fig-i" data-title=...>``."""
    import plotly.io as pio

    parts, n = [], 0
    nav = " ".join(f'<a href="#s{i}">{esc(s.title)}</a>' for i, s in enumerate(sections))
    for i, s in enumerate(sections):
        parts.append(f'<h2 id="s{i}">{esc(s.title)}</h2>\n{s.intro}')
        for item in s.items:
            if isinstance(item, Figure):
                div = pio.to_html(
                    item.fig,
                    full_html=False,
                    include_plotlyjs=(n == 0),
                    config={"displaylogo": False},
                    div_id=f"sk-plot-{n}",
                )
                parts.append(
                    f'<div class="sk-fig" id="sk-fig-{n}" data-title="{esc(item.title)}">{div}</div>'
                )
                n += 1
            else:
                parts.append(item)
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<style>{_STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n<p class="meta">{meta_html}</p>\n'
        f"<nav>{nav}</nav>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path = out_dir / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path


def chromium() -> Optional[str]:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def write_pngs(sections: list[Section], png_dir: Path, browser: str, progress: bool = True) -> list[Path]:
    """One PNG per figure (``NN-name.png``) via ``chromium --headless --screenshot``, two at a time."""
    import plotly.io as pio
    from plotly.offline import get_plotlyjs
    from tqdm.auto import tqdm

    figs = [f for s in sections for f in s.figures()]
    png_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparsekern-png-") as tmp:
        (Path(tmp) / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
        jobs = []
        for i, f in enumerate(figs):
            page = Path(tmp) / f"fig{i}.html"
            div = pio.to_html(f.fig, full_html=False, include_plotlyjs=False, config={"staticPlot": True})
            page.write_text(
                '<!DOCTYPE html><html><head><meta charset="utf-8">'
                '<script src="plotly.min.js"></script><style>body{margin:0;background:#fff}'
                f"</style></head><body>{div}</body></html>",
                encoding="utf-8",
            )
            jobs.append((page, png_dir / f"{i + 1:02d}-{f.name}.png", f.size))

        def shoot(job: tuple[Path, Path, tuple[int, int]]) -> Path:
            page, png, (w, h) = job
            cmd = [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--virtual-time-budget=5000",
                f"--window-size={w},{h}",
                f"--screenshot={png}",
                page.resolve().as_uri(),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp)
            if proc.returncode != 0 or not png.exists():
                raise RuntimeError(f"chromium could not screenshot {png.name}: {proc.stderr[-500:]}")
            return png

        with ThreadPoolExecutor(2) as pool:
            return list(
                tqdm(pool.map(shoot, jobs), total=len(jobs), desc="PNG figures", disable=not progress)
            )
