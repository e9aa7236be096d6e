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


@pytest.mark.parametrize("path", sorted((ROOT / "loading").glob("*.py")), ids=lambda p: p.name)
def test_loading_never_needs_the_registry(path):
    # readers return data: the class name in an error or a config's fields come in as arguments
    mods = _imported_modules(path)
    bad = sorted(m for m in mods if m.startswith(("sparsekern.registry", "sparsekern._registry")))
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


# ---- the shard loader: saes/ never imports distributed/, the package root wires it in -------------
def test_saes_never_import_distributed():
    bad = {
        p.name: sorted(m for m in _imported_modules(p) if m.startswith("sparsekern.distributed"))
        for p in sorted((ROOT / "saes").glob("*.py"))
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_shard_loader_is_an_extension_point(tmp_path, monkeypatch):
    from sparsekern import registry

    default = registry.shard_loader()
    assert default.__module__ == "sparsekern"  # the root's, which imports distributed when called
    calls = []

    def fake(path, device, dtype, *, group, fold_W_dec_norm):
        calls.append((str(path), device, dtype, group, fold_W_dec_norm))
        return sk.SAE.load_from_disk(path)

    sk.StandardSAE(sk.StandardSAEConfig(d_in=4, d_sae=8)).save_model(tmp_path)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_shard_loader(fake)
    with pytest.raises(TypeError, match="must be callable"):
        registry.register_shard_loader("not a function", replace=True)
    try:
        registry.register_shard_loader(fake, replace=True)
        registry.register_shard_loader(fake)  # the same one again: fine
        got = sk.SAE.load_from_disk(tmp_path, "cpu", "float64", shard=True, group="G", fold_W_dec_norm=True)
        assert isinstance(got, sk.StandardSAE)
        assert calls == [(str(tmp_path), "cpu", "float64", "G", True)]
        with pytest.raises(ValueError, match="Loaded SAE is not of type TopKSAE"):
            sk.TopKSAE.load_from_disk(tmp_path, shard=True)
        with pytest.raises(ValueError, match="no converter"):
            sk.SAE.load_from_disk(tmp_path, converter=lambda *a, **k: None, shard=True)
    finally:
        registry.register_shard_loader(default, replace=True)
    monkeypatch.setattr(registry, "_SHARD_LOADER", [])
    with pytest.raises(RuntimeError, match="needs a shard loader and none is registered"):
        sk.SAE.load_from_disk(tmp_path, shard=True)


def test_default_shard_loader_imports_distributed_on_first_use(tmp_path):
    code = (
        "import sys, torch, torch.distributed as dist\n"
        "import sparsekern as sk\n"
        "sae = sk.TopKSAE(sk.TopKSAEConfig(d_in=6, d_sae=10, k=3))\n"
        f"sae.save_model({str(tmp_path / 'sae')!r})\n"
        "print('sparsekern.distributed' in sys.modules)\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'pg'}', rank=0, world_size=1)\n"
        f"sh = sk.SAE.load_from_disk({str(tmp_path / 'sae')!r}, shard=True)\n"
        "from sparsekern.distributed import ShardedSAE\n"
        "x = torch.randn(5, 6)\n"
        "print(isinstance(sh, ShardedSAE) and isinstance(sh, sk.TopKSAE), torch.equal(sh(x), sae(x)))\n"
        "dist.destroy_process_group()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_public_seams_for_derived_saes():
    import sparsekern.saes as saes

    assert issubclass(sk.TopKSAE, saes.TopKMixin) and issubclass(sk.TopKSkipTranscoder, saes.TopKMixin)
    assert issubclass(sk.JumpReLUTranscoder, saes.JumpReLUMixin)
    assert not issubclass(sk.TopKSAE, saes.JumpReLUMixin)
    sae = sk.StandardSAE(sk.StandardSAEConfig(d_in=4, d_sae=8))
    assert not saes.has_hooks(sae.hook_sae_acts_post)
    sae.hook_sae_acts_post.add_hook(lambda t, hook: None)
    assert saes.has_hooks(sae.hook_sae_acts_post) and not saes.has_hooks(sae.hook_sae_acts_pre)
    # build_sae's factory: the module a derived class wants, holding the state dict's tensors
    made = []

    class Tagged(sk.StandardSAE):
        pass

    state = {k: v.clone() for k, v in sae.state_dict().items()}
    cfg_dict = sae.cfg.to_dict()
    out = saes.build_sae(sk.SAE, cfg_dict, state, factory=lambda c, cfg: made.append(c) or Tagged(cfg))
    assert type(out) is Tagged and made == [sk.StandardSAE] and out.cfg.device == "cpu"
    assert all(getattr(out, k).data_ptr() == t.data_ptr() for k, t in state.items())  # used as they are
