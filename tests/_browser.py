"""Headless Chromium for the report tests: render a page with an error hook, dump its DOM, screenshot it.

``render`` injects :data:`ERROR_HOOK` before every other script of the page: JavaScript errors land in
``<pre id="sk-js-errors">`` and ``<pre id="sk-js-loaded">`` proves the scripts ran to the load event;
``chromium --headless --dump-dom`` executes the scripts, so the dumped DOM shows both. Without Chromium
the calling test skips (``scripts/test.sh`` installs Debian's ``chromium`` with apt where it can).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from sparsekern.demo import report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# runs before every other script of the page; errors land in <pre id="sk-js-errors">, and a
# <pre id="sk-js-loaded"> proves that scripts ran to the load event
ERROR_HOOK = """<script>
(function () {
  function report(text) {
    var p = document.getElementById('sk-js-errors');
    if (!p) {
      p = document.createElement('pre'); p.id = 'sk-js-errors'; document.documentElement.appendChild(p);
    }
    p.textContent += text + '\\n';
  }
  window.onerror = function (msg, src, line, col) { report(msg + ' @ ' + src + ':' + line + ':' + col); };
  window.addEventListener('unhandledrejection', function (e) { report('unhandled rejection: ' + e.reason); });
  window.addEventListener('load', function () {
    setTimeout(function () {
      var d = document.createElement('pre');
      d.id = 'sk-js-loaded'; d.textContent = 'loaded'; d.style.display = 'none';
      document.body.appendChild(d);
    }, 0);
  });
})();
</script>"""


def chromium() -> str:
    """The browser ``sparsekern demo`` would use; skips the calling test when there is none."""
    path = report.chromium()
    if path is None:
        pytest.skip(
            "Chromium is not installed (scripts/test.sh installs Debian's `chromium` with apt where it can)"
        )
    return path


def render(
    page: Path, tmp_path: Path, shot_name: str, save: bool = True, height: int = 2000
) -> tuple[str, Path]:
    """(dumped DOM after the scripts ran, screenshot path) for page, with the error hook injected."""
    text = page.read_text(encoding="utf-8")
    assert "<head>" in text
    hooked = tmp_path / f"hooked-{page.name}"
    hooked.write_text(text.replace("<head>", "<head>" + ERROR_HOOK, 1), encoding="utf-8")
    shot = tmp_path / shot_name
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--virtual-time-budget=10000",
        f"--window-size=1400,{height}",
        f"--screenshot={shot}",
        "--dump-dom",
        hooked.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 1_000, proc.stderr[-2000:]
    if save and os.environ.get("SPARSEKERN_SAVE_SCREENSHOT"):
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, RESULTS / shot_name)
    return proc.stdout, shot


def js_errors(dom: str) -> Optional[str]:
    """The JavaScript errors the page reported (None if none); asserts that its scripts ran."""
    assert 'id="sk-js-loaded"' in dom, "the page's scripts did not run to the load event"
    errors = re.search(r'<pre id="sk-js-errors">(.*?)</pre>', dom, re.S)
    return html.unescape(errors.group(1)) if errors else None
