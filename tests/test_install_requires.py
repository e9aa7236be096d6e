"""setup.py declares every third-party package that importing sparsekern's modules needs.

Static (``ast``), so it also holds on a machine where everything happens to be installed: every
module-level import under ``sparsekern/`` that is not inside ``try``/``if TYPE_CHECKING``/an
availability check must name a package in ``install_requires`` (or be listed as OPTIONAL below, with
the reason it is safe).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsekern"
# import name -> distribution name, where they differ
DIST = {"transformer_lens": "transformer-lens", "huggingface_hub": "huggingface-hub", "sae_lens": "sae-lens"}
# imported at module level only by modules that are themselves imported lazily, after a check
OPTIONAL = {
    "triton": "only sparsekern/triton/* imports it; ops import those modules inside functions, after "
              "_backend.has_triton()",
}
_GUARDS = ("TYPE_CHECKING", "has_triton", "find_spec")


def _requirements(keyword: str) -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            for kw in node.keywords:
                if kw.arg == keyword:
                    return ast.literal_eval(kw.value)
    raise AssertionError(f"setup() has no {keyword}")


def _dist(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _module_level_imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of the unguarded module-level imports of one file (absolute and relative)."""
    found: list[tuple[str, int]] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])

    def absolute(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((a.name, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = absolute(node)
                found.append((mod, node.lineno))
                if node.level and not node.module:  # from . import x, y -> package.x, package.y
                    found.extend((f"{mod}.{a.name}", node.lineno) for a in node.names)
            elif isinstance(node, ast.Try):
                walk(node.orelse)
                walk(node.finalbody)  # the try body itself is guarded (except ImportError)
            elif isinstance(node, ast.If):
                if not any(g in ast.unparse(node.test) for g in _GUARDS):
                    walk(node.body)
                walk(node.orelse)

    walk(ast.parse(path.read_text()).body)
    return found


def _third_party(name: str) -> bool:
    top = name.split(".")[0]
    return bool(top) and top not in sys.stdlib_module_names and top not in ("sparsekern", "__future__")


def test_module_level_imports_are_declared():
    declared = {_dist(r) for r in _requirements("install_requires")}
    missing: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        for name, line in _module_level_imports(path):
            top = name.split(".")[0]
            if not _third_party(name) or top in OPTIONAL:
                continue
            if DIST.get(top, top).lower().replace("_", "-") not in declared:
                missing.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{line}")
    assert not missing, f"imported at module level but not in setup.py install_requires: {missing}"


def test_optional_imports_stay_lazy():
    """The OPTIONAL packages are imported at module level only inside their own lazily imported modules."""
    for top in OPTIONAL:
        for path in sorted(PKG.rglob("*.py")):
            if path.is_relative_to(PKG / top):  # sparsekern/triton/* may import triton
                continue
            bad = [(n, ln) for n, ln in _module_level_imports(path)
                   if n.split(".")[0] == top or n.startswith(f"sparsekern.{top}")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad} at module level; {top}: {OPTIONAL[top]}"


def test_the_scan_sees_the_known_imports():
    """Guards the scan itself: the imports the issue named are found where they are."""
    sae = _module_level_imports(PKG / "saes" / "pipeline.py")  # the SAE base class (was saes/sae.py)
    assert any(n.startswith("transformer_lens") for n, _ in sae)
    assert any(n == "einops" for n, _ in _module_level_imports(PKG / "patching" / "attribution.py"))


def test_extras():
    extras = _requirements("extras_require")
    assert "plotly" in {_dist(r) for r in extras["report"]}
    # `sparsekern demo` must work after a plain `pip install sparsekern`
    assert "plotly" in {_dist(r) for r in _requirements("install_requires")}
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "plotly" in {_dist(line) for line in dev if line.strip() and not line.startswith("#")}
