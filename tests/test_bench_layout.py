"""How sparsekern/bench/ is put together: no import cycle among its modules (none hidden in a function
either), every module imports on its own in a fresh interpreter, and every suite declares the runner's
interface and has no driver of its own."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import sparsekern.bench as bench

BENCH = pathlib.Path(bench.__file__).parent
MODULES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
SUITE_MODULES = ("suite", "features", "training", "patching", "distributed")
MAX_LINES = 500  # one job per room (rule of thumb)


def _bench_imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(bench module imported, line, at module level?) for each import of a sibling in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # imports under a module-level `if` / `try` still run at import time
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(m) for m in ast.walk(n)}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            if isinstance(node, ast.Import):
                out += [(a.name.split(".")[2], node.lineno, id(node) in top) for a in node.names
                        if a.name.startswith("sparsekern.bench.") and len(a.name.split(".")) > 2]
            continue
        if node.level == 1:  # from . import x / from .x import y
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif node.level == 0 and (node.module or "").startswith("sparsekern.bench"):
            parts = node.module.split(".")
            names = [parts[2]] if len(parts) > 2 else [a.name for a in node.names]
        else:
            continue
        out += [(m, node.lineno, id(node) in top) for m in names if m in MODULES]
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {dst for dst, _, _ in _bench_imports(BENCH / f"{m}.py")} for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as [a, b, ..., a], or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str]:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [m, n] if n in path else [m, n]
            if n not in state and (found := visit(n, path + [m])):
                return found
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])):
            return found
    return []


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_bench():
    graph = _graph()
    assert graph["cases"] >= {"gpu_plan", "sae_cases", "workload"}  # the check sees the imports
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_bench_modules_import_each_other_at_module_level_only():
    lazy = [f"{m}.py:{line}: imports .{dst} inside a function" for m in MODULES
            for dst, line, top in _bench_imports(BENCH / f"{m}.py") if not top]
    assert lazy == []


def test_bench_modules_stay_small():
    big = {m: n for m in MODULES if (n := len((BENCH / f"{m}.py").read_text().splitlines())) > MAX_LINES}
    assert big == {}


_FRESH = textwrap.dedent("""
    import importlib, os, sys, traceback
    import torch  # shared by the children; nothing of sparsekern is imported before the fork
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1] != 0:
            failed.append(name)
    print("FAILED", *failed)
    sys.exit(1 if failed else 0)
""")


def test_every_bench_module_imports_alone_in_a_fresh_interpreter():
    names = [f"sparsekern.bench.{m}" for m in MODULES] + [
        "sparsekern.bench", "sparsekern.cli", "sparsekern.distributed.synthetic",
        "sparsekern.distributed.demo"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parents[1]),
                                                                   os.environ.get("PYTHONPATH")]))}
    if hasattr(os, "fork") and sys.platform == "linux":  # one interpreter start, a fresh fork per module
        res = subprocess.run([sys.executable, "-c", _FRESH, *names], capture_output=True, text=True, env=env,
                             timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        return
    for name in names:  # elsewhere forking after importing torch is unsafe: one interpreter each
        res = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, f"{name}:\n{res.stderr}"


@pytest.mark.parametrize("module", SUITE_MODULES)
def test_every_suite_declares_the_runner_interface(module):
    mod = importlib.import_module(f"sparsekern.bench.{module}")
    s = mod.SUITE
    assert isinstance(s, bench.Suite) and s.name == mod.NAME and s.cases == mod.CASES
    assert s.columns == mod.COLUMNS and len(set(s.columns)) == len(s.columns)
    assert s.key in s.columns and "status" in s.columns and "note" in s.columns
    assert s.table and callable(s.jobs) and callable(s.settings)
    assert not hasattr(mod, "main") and not hasattr(mod, "format_table")  # the runner drives every suite
