"""Issue 12, layout: ``sparsekern/saes/`` (one file per architecture), leaf ``_registry`` / ``_constants``,
readers in ``sparsekern/loading/`` that return data and never import the SAE family, and the old modules
(``sparsekern.sae``, ``sparsekern.transcoder``, ``sparsekern.loading.load_*``) still working."""

import ast
import pathlib
import subprocess
import sys

import pytest

import sparsekern as sk

ROOT = pathlib.Path(sk.__file__).parent
SAE_FAMILY = ("sparsekern.saes", "sparsekern.sae", "sparsekern.transcoder")


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module an ``import`` / ``from ... import`` anywhere in the file names."""
    package = "sparsekern." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    package = package.rstrip(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from .. import sae` names a module
    return out


def _is_sae_family(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in SAE_FAMILY)


@pytest.mark.parametrize("path", sorted((ROOT / "loading").glob("*.py")), ids=lambda p: p.name)
def test_loading_never_imports_the_sae_family(path):
    bad = sorted(m for m in _imported_modules(path) if _is_sae_family(m))
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("leaf", ["_registry.py", "_constants.py"])
def test_leaves_import_nothing_of_the_sae_family(leaf):
    src = (ROOT / leaf).read_text()
    tree = ast.parse(src)
    # _registry may name the SAE types for type checking only
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    mods = {(n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top}
    assert not any("sae" in m.split(".")[-1] or "transcoder" in m for m in mods), mods


def test_importing_every_loading_module_loads_no_sae_class():
    code = (
        "import sys, pkgutil, importlib, sparsekern.loading as L\n"
        "for m in pkgutil.iter_modules(L.__path__): importlib.import_module('sparsekern.loading.' + m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith(('sparsekern.sae', 'sparsekern.transcoder'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_registry_refuses_a_different_class_and_imports_saes_on_a_miss():
    code = (
        "import sys\n"
        "from sparsekern._registry import get_sae_class, register_sae_class\n"
        "assert 'sparsekern.saes' not in sys.modules\n"
        "cls, cfg = get_sae_class('topk_skip_transcoder')\n"
        "print(cls.__module__, cfg.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["sparsekern.saes.transcoder", "TopKSkipTranscoderConfig"]

    from sparsekern._registry import get_sae_class, register_sae_class

    register_sae_class("topk", sk.TopKSAE, sk.TopKSAEConfig)  # the same pair again: fine

    class MyTopK(sk.TopKSAE):
        pass

    with pytest.raises(ValueError, match=r"'topk' is already registered to \(TopKSAE, TopKSAEConfig\)"):
        register_sae_class("topk", MyTopK, sk.TopKSAEConfig)
    assert get_sae_class("topk") == (sk.TopKSAE, sk.TopKSAEConfig)
    with pytest.raises(ValueError, match="unknown SAE architecture 'nope'"):
        get_sae_class("nope")


OLD_SAE_NAMES = """SAE SAEConfig SAEMetadata StandardSAE StandardSAEConfig GatedSAE GatedSAEConfig JumpReLUSAE
JumpReLUSAEConfig TopKSAE TopKSAEConfig _JumpReLU _TopK _REGISTRY register_sae_class get_sae_class
str_to_dtype dtype_to_str _DTYPES NORMALIZE_MODES SAE_CFG_FILENAME SAE_WEIGHTS_FILENAME SPARSITY_FILENAME
_sae_lens_version _SPARSEKERN_ONLY_FIELDS _has_hooks _version _identity _identity_out _unflatten_heads _Code
_check_cls SparseActs dense_to_sparse T""".split()
OLD_TRANSCODER_NAMES = """Transcoder TranscoderConfig SkipTranscoder SkipTranscoderConfig JumpReLUTranscoder
JumpReLUTranscoderConfig JumpReLUSkipTranscoder JumpReLUSkipTranscoderConfig
TopKTranscoder TopKTranscoderConfig
TopKSkipTranscoder TopKSkipTranscoderConfig
SAE SAEConfig _JumpReLU _TopK register_sae_class""".split()


def test_shims_re_export_every_old_name():
    import sparsekern.sae as old_sae
    import sparsekern.saes as saes
    import sparsekern.transcoder as old_tc

    assert [n for n in OLD_SAE_NAMES if not hasattr(old_sae, n)] == []
    assert [n for n in OLD_TRANSCODER_NAMES if not hasattr(old_tc, n)] == []
    assert old_sae.SAE is saes.SAE is sk.SAE and old_tc.TopKTranscoder is saes.TopKTranscoder
    assert old_sae.str_to_dtype("torch.float16") is saes.str_to_dtype("float16")


def test_package_root_stays_lazy():
    code = (
        "import sys, sparsekern; print(*(m in sys.modules for m in ('sparsekern.saes', 'transformer_lens')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert sk._LAZY["TopKSkipTranscoderConfig"] == "saes" and sk._LAZY["SAEMetadata"] == "saes"


def test_loading_aliases_are_the_classmethods():
    import sparsekern.loading as L

    import sparsekern.loading.formats as F

    for name in ("load_sparsify", "load_circuit_tracer", "load_gemma_scope_npz"):
        assert getattr(L, name) == getattr(F, name) == getattr(sk.SAE, name)
    with pytest.raises(AttributeError):
        L.no_such_thing  # noqa: B018
