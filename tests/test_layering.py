"""The house's two import rules, checked on the source (an AST pass over every module of sparsekern):

1. **Floors.** Data flows one way (tokens -> model -> activations -> SparseActs -> analysis -> graphs), so a
   package imports only packages on lower floors (or its own), anywhere in a file: at module level, in a
   function (lazily) or under ``TYPE_CHECKING``.
2. **Public seams.** A package uses another only through its public names: no ``_private`` module or name
   of another package is imported.

The package root ``sparsekern/__init__.py`` wires the floors together (lazy class names, extension
points) and may import anything; nothing else may import from it but its public re-exports.
"""

from __future__ import annotations

import ast
import pathlib

import sparsekern as sk

ROOT = pathlib.Path(sk.__file__).parent

# Floor of every top-level module / package of sparsekern (lower floors never import higher ones).
# Packages that share a floor may import each other (e.g. ``registry`` fills itself from ``saes``).
FLOORS: dict[str, int] = {
    # leaves: no sparsekern imports of their own
    "constants": 0, "tracing": 0, "hook_names": 0, "backends": 0,
    # kernels and their float64 references
    "ref": 1, "mps": 2, "triton": 2,
    "sparse_acts": 3, "ops": 4,
    # files -> (cfg dict, state dict); then the SAE family (and its class registry) built from them
    "loading": 5, "registry": 6, "saes": 6, "sae": 6, "transcoder": 6, "compat": 6,
    "hooked_sae_transformer": 7,
    # analysis on activations
    "features": 8, "patching": 9, "training": 10,
    # graphs and scale-out
    "distributed": 12,
    # programs on top
    "toy": 13, "bench": 14, "demo": 15, "cli": 16,
    # deprecated aliases of renamed leaves (the same module objects as their new names)
    "_backend": 0, "_constants": 0, "_registry": 6, "_tracing": 0,
}

# Deprecated aliases of renamed leaves are the same module objects as their new names.
ALIASES = {"_backend": "backends", "_constants": "constants", "_registry": "registry", "_tracing": "tracing"}

# Deprecation shims, exempt from both rules: each keeps old public names working, and says why here.
SHIMS: dict[str, str] = {
    "sae.py": "sparsekern.sae re-exports every name the module had before saes/ (tests/test_saes_layout.py)",
    "transcoder.py": "sparsekern.transcoder likewise",
    "loading/deprecated.py": "sparsekern.loading(.formats).load_* built SAEs before saes/; now deprecated "
    "aliases of the SAE classmethods, reached through the package root (tests/test_saes_layout.py)",
}


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "weights" not in p.parts)


def _unit(parts: tuple[str, ...]) -> str | None:
    """The top-level module / package a dotted name under sparsekern belongs to (None: the root)."""
    return parts[0] if parts else None


def _imports(path: pathlib.Path):
    """(line, absolute module parts after 'sparsekern', imported name or None) for each sparsekern import."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1]  # the package the file is in (for relative imports)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "sparsekern":
                    yield node.lineno, tuple(parts[1:]), None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = tuple(base) + (tuple(node.module.split(".")) if node.module else ())
            else:
                parts = (node.module or "").split(".")
                if parts[0] != "sparsekern":
                    continue
                mod = tuple(parts[1:])
            for a in node.names:
                yield node.lineno, mod, a.name


def _target(mod: tuple[str, ...], name: str | None) -> tuple[str, ...]:
    """What an import reaches: ``from sparsekern import ops`` the unit ``ops``; ``from .ops import x``
    ``ops`` too; ``from sparsekern import SAE`` (a lazy re-export of the root) the unit defining it."""
    if mod or name is None:
        return mod
    if name in sk._LAZY:
        return (sk._LAZY[name], name)
    if (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file() or name.startswith("__"):
        return (name,) if not name.startswith("__") else ()
    defined_in = getattr(getattr(sk, name), "__module__", "sparsekern").split(".")[1:]
    return (*defined_in, name)


def _violations() -> tuple[list[str], list[str]]:
    floors, seams = [], []
    for path in _modules():
        rel = path.relative_to(ROOT)
        parts = rel.with_suffix("").parts
        if parts == ("__init__",):
            continue  # the package root wires the floors together
        if str(rel) in SHIMS:
            continue
        src = parts[0]
        for line, mod, name in _imports(path):
            target = _target(mod, name)
            dst = _unit(target)
            where = f"{rel}:{line}: {'.'.join(('sparsekern',) + mod)}{' import ' + name if name else ''}"
            if dst is None or dst == src:
                continue
            if src not in FLOORS or dst not in FLOORS:
                floors.append(f"{where} (give {src if src not in FLOORS else dst!r} a floor in FLOORS)")
            elif FLOORS[dst] > FLOORS[src]:
                floors.append(f"{where} ({src} is on floor {FLOORS[src]}, {dst} on floor {FLOORS[dst]})")
            private = [p for p in target[1:] if p.startswith("_") and not p.startswith("__")]
            if name is not None and mod and name.startswith("_") and not name.startswith("__"):
                private.append(name)
            if dst in ALIASES:
                private.append(f"{dst} (a deprecated alias: import sparsekern.{ALIASES[dst]})")
            elif dst.startswith("_"):
                private.append(dst)
            if private:
                seams.append(f"{where} (private: {', '.join(private)})")
    return floors, seams


def test_every_unit_has_a_floor():
    units = {p.relative_to(ROOT).with_suffix("").parts[0] for p in _modules()} - {"__init__"}
    assert sorted(units - set(FLOORS)) == [] and sorted(set(FLOORS) - units) == []


def test_lower_floors_never_import_higher_ones():
    floors, _ = _violations()
    assert floors == [], "\n".join(floors)


def test_no_private_names_across_packages():
    _, seams = _violations()
    assert seams == [], "\n".join(seams)

