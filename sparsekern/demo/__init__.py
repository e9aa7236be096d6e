"""``sparsekern demo``: the package showing its work on the shipped toy model, offline.

:func:`run_demo` loads :mod:`sparsekern.toy` and writes one report with a section per seed analysis:

1. IOI: logit difference, direct logit attribution per head and component, logit lens (:mod:`.ioi`);
2. exact activation patching, each function timed beside ``transformer_lens.patching`` with the speed-up
   and the max difference stated; attribution patching beside it with the correlation (:mod:`.patching`);
3. SAE features: top activating examples with highlighted context, feature density, co-occurrence,
   decoder neighbours, promoted tokens, feature ablation on the IOI prompts (:mod:`.features`).

Output in ``out_dir``: ``sparsekern-demo.html`` (self-contained: plotly.js embedded, opens offline),
``png/NN-<figure>.png`` (one per figure, drawn by headless Chromium when it is installed) and
``demo.json`` (every number the report states).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from .report import chromium, write_pngs, write_report

__all__ = ["DemoResult", "run_demo", "check_out_dir"]


@dataclass
class DemoResult:
    report: Path  # the HTML page
    pngs: list[Path]  # one per figure ([] when Chromium is missing or png=False)
    numbers: dict  # what demo.json holds
    png_note: Optional[str] = None  # why there are no PNGs, if there are none


def check_out_dir(out_dir: Union[str, Path]) -> Path:
    """``out_dir`` resolved; it may be new, but its parent must be an existing, writable folder."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"sparsekern demo: --out {str(out_dir)!r} exists and is not a folder")
    if not out.exists() and not out.parent.is_dir():
        raise FileNotFoundError(
            f"sparsekern demo: --out {str(out_dir)!r}: the parent folder {str(out.parent)!r} does not exist "
            "(create it first, or choose another --out)"
        )
    return out


def run_demo(
    out_dir: Union[str, Path] = "sparsekern-demo",
    *,
    quick: bool = False,
    progress: bool = True,
    png: bool = True,
    device: str = "cpu",
) -> DemoResult:
    """Run every section on the toy model and write the report; returns its paths and numbers.

    quick: 8 IOI prompts, 256 corpus texts, one timing repeat (about half a minute on 2 cores); else 32
    prompts, 2048 texts, best of 3 timings. png: also screenshot every figure (needs Chromium).
    """
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ImportError(
            "sparsekern demo draws with plotly: pip install plotly (or 'sparsekern[report]')"
        ) from None
    from tqdm.auto import tqdm

    from .. import toy
    from . import features, ioi, patching

    out = check_out_dir(out_dir)
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    model, saes = toy.load(device=device)
    n_prompts, n_texts, repeats = (8, 256, 1) if quick else (32, 2048, 3)
    numbers: dict = {
        "quick": quick,
        "device": device,
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "toy_report": toy.report()["model"],
    }
    steps = 2 + 2 * len(patching.FUNCTIONS) + 3
    with tqdm(total=steps, desc="sparsekern demo", disable=not progress) as bar:
        bar.set_postfix_str("IOI")
        batch = ioi.build_batch(model, n_prompts)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.clean)
        sections = [ioi.section(model, batch, cache, numbers)]
        bar.update(2)
        exact = patching.run_exact(model, batch, cache, repeats, bar)
        sections.append(patching.exact_section(model, batch, exact, numbers))
        attr = patching.run_attribution(model, batch, cache, exact, bar)
        sections.append(patching.attribution_section(attr, exact, numbers))
        feat = features.run(model, saes["resid_sae"], batch, n_texts, progress=False, bar=bar)
        sections.append(features.section(model, saes["resid_sae"], feat, numbers))
    numbers["elapsed_s"] = round(time.perf_counter() - t0, 1)
    meta = (
        f"Toy model shipped in <code>sparsekern.toy</code> (2 layers, d_model 128, word-level vocabulary; "
        f"trained by <code>scripts/train_toy.py</code>). {numbers['machine']}, torch {torch.__version__}, "
        f"{'--quick, ' if quick else ''}{numbers['date']}, {numbers['elapsed_s']} s."
    )
    report = write_report(sections, out, "sparsekern demo: the toy model, patched and taken apart", meta)
    pngs, note = [], None
    if png:
        browser = chromium()
        if browser is None:
            note = (
                "PNG figures skipped: no Chromium found (apt install chromium); the HTML report has them all"
            )
        else:
            pngs = write_pngs(sections, out / "png", browser, progress=progress)
    else:
        note = "PNG figures not requested (--no-png)"
    numbers["figures"] = [f.title for s in sections for f in s.figures()]
    numbers["pngs"] = [str(p.relative_to(out)) for p in pngs]
    (out / "demo.json").write_text(json.dumps(numbers, indent=1, default=float), encoding="utf-8")
    return DemoResult(report, pngs, numbers, note)


def summary(res: DemoResult) -> str:
    """The lines the CLI prints: the headline numbers and where the report is."""
    n = res.numbers
    lines = [
        f"IOI: accuracy {n['ioi']['accuracy']:.0%}, logit diff {n['ioi']['logit_diff']:.2f} "
        f"(corrupted {n['ioi']['corrupted_logit_diff']:.2f}), strongest head {n['ioi']['top_head']}"
    ]
    for name, v in n["patching"].items():
        a = n["attribution"][name]
        lines.append(
            f"{name}: {v['speedup']:.1f}x faster than TransformerLens ({v['transformer_lens_s']:.2f} s "
            f"vs {v['sparsekern_s']:.2f} s), max diff {v['max_abs_diff']:.1e}; attribution r = "
            f"{a['correlation']:.3f}"
        )
    f = n["features"]
    lines.append(
        f"SAE: {f['n_tokens']} tokens, {f['dead']} dead of {f['d_sae']}, {f['active_on_ioi']} features "
        f"active on IOI; ablation vs hooked forwards max diff {f['ablation_reference_max_diff']:.1e}"
    )
    lines.append(res.png_note or f"{len(res.pngs)} PNG figures in {res.report.parent / 'png'}")
    lines.append(f"report: {res.report}")
    return "\n".join(lines)
