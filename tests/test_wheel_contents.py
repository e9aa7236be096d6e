"""setup.py ships every file of the package: each subpackage is found and each data file is package data.

Static and fast (no build): ``find_packages`` only finds folders with an ``__init__.py``, and only files
matched by a ``package_data`` glob of an enclosing package go into the wheel, so a new data file (or
weights folder) that no glob covers would be missing from ``pip install .`` while every test here passes
from the checkout. scripts/wheel_check.sh (CI) builds the real wheel and checks its contents.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsekern"


def _setup_kwarg(keyword: str):
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == keyword:
                    return kw.value
    raise AssertionError(f"setup() has no {keyword}")


def _package_data() -> dict[str, list[str]]:
    return ast.literal_eval(_setup_kwarg("package_data"))


def _package_files() -> list[Path]:
    """The package's files: git-tracked ones in a checkout, else everything but build outputs."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "sparsekern"], check=True,
                             capture_output=True, timeout=60).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        files = [p for p in PKG.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file() and not p.name.endswith((".so", ".pyd", ".pyc"))]


def _covered(path: Path, package_data: dict[str, list[str]]) -> bool:
    """Whether a package_data glob of a package enclosing ``path`` matches it (as setuptools globs)."""
    for package, patterns in package_data.items():
        base = ROOT.joinpath(*package.split(".")) if package else None
        bases = [base] if base else [d for d in path.parents if (d / "__init__.py").is_file()]
        for b in bases:
            if b in path.parents and any(path in set(b.glob(pat)) for pat in patterns):
                return True
    return False


def test_setup_finds_every_subpackage():
    packages = _setup_kwarg("packages")
    assert "find_packages" in ast.unparse(packages) and "sparsekern.*" in ast.unparse(packages)
    no_init = sorted(str(d.relative_to(ROOT)) for d in {p.parent for p in PKG.rglob("*.py")}
                     if "__pycache__" not in d.parts and not (d / "__init__.py").is_file())
    assert not no_init, f"folders with Python files but no __init__.py (find_packages skips them): {no_init}"


def test_every_data_file_is_package_data():
    package_data = _package_data()
    data = [p for p in _package_files() if p.suffix != ".py"]
    assert data, "found no data files under sparsekern/"
    missing = [str(p.relative_to(ROOT)) for p in data if not _covered(p, package_data)]
    assert not missing, f"not matched by setup.py package_data (so not in the wheel): {missing}"


def test_the_toy_weights_are_package_data():
    """Guards the check itself: the files sparsekern.toy.load() reads are there and covered."""
    from sparsekern.toy import SAE_NAMES

    weights = PKG / "toy" / "weights"
    needed = [weights / n for n in ("model.safetensors", "model_cfg.json", "vocab.json", "REPORT.json")]
    needed += [weights / sae / f for sae in SAE_NAMES for f in ("cfg.json", "sae_weights.safetensors")]
    assert set(SAE_NAMES) == {"resid_sae", "mlp0_transcoder"}
    package_data = _package_data()
    for f in needed:
        assert f.is_file(), f"{f.relative_to(ROOT)} is missing from the checkout"
        assert _covered(f, package_data), f"{f.relative_to(ROOT)} is not package data"
    assert not _covered(ROOT / "setup.py", package_data)
