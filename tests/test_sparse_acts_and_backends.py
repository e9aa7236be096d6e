"""SparseActs helpers, backend selection and the import-time fallback."""

import os
import subprocess
import sys

import torch

import sparsekern as sk
from sparsekern import backends
from sparsekern.ops import SparseActs, topk_encode

from _bounds import assert_topk_decided, encoder_err


def test_sparse_acts_helpers():
    acts = SparseActs(torch.tensor([[[2.0, 0.0, 1.0]]]), torch.tensor([[[4, 0, 1]]]))
    assert acts.shape == (1, 1, 3) and acts.k == 3
    assert acts.l0().tolist() == [[2]]
    dense = acts.to_dense(6)
    assert dense.tolist() == [[[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]]]
    v, i = acts
    assert v is acts.values and i is acts.indices
    half = acts.to(torch.float16)
    assert half.dtype == torch.float16 and half.indices.dtype == torch.int64


def test_padding_index_does_not_clobber_real_value():
    # padding slot (value 0) shares index 3 with a real activation
    acts = SparseActs(torch.tensor([[5.0, 0.0]]), torch.tensor([[3, 3]]))
    assert acts.to_dense(4)[0, 3] == 5.0


def test_backends_lists_ref_and_env_forces(monkeypatch):
    assert "ref" in sk.backends()
    assert sk.backends()[-1] == "ref"
    monkeypatch.setenv("SPARSEKERN_BACKEND", "ref")
    assert backends.select("topk_encode", torch.device("cpu"))[0] == "ref"
    monkeypatch.setenv("SPARSEKERN_BACKEND", "auto")
    expected = "cpp" if "cpp" in sk.backends() else "ref"
    assert backends.select("topk_encode", torch.device("cpu"))[0] == expected
    with sk.use_backend("ref"):
        assert backends.select("sparse_decode", torch.device("cpu"))[0] == "ref"


def test_unknown_device_falls_back_to_reference():
    # any device without a native kernel (e.g. MPS) runs the reference
    assert backends.select("sparse_decode", torch.device("meta"))[0] == "ref"


def test_import_without_extension_warns_once_and_works():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import sparsekern as sk\n"
        "    from sparsekern.ops import topk_encode\n"
        "    topk_encode(torch.randn(3, 4), torch.randn(4, 9), torch.zeros(9), 2)\n"
        "    topk_encode(torch.randn(3, 4), torch.randn(4, 9), torch.zeros(9), 2)\n"
        "msgs = [str(x.message) for x in w if 'C++ extension' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert sk.backends() == ['ref'], sk.backends()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SPARSEKERN_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_same_result_every_backend():
    x, W, b = torch.randn(16, 12), torch.randn(12, 64), torch.randn(64)
    # each backend's fp32 pre is within E = gamma(14) * sum |terms| of the exact one (any order), so the
    # decided top-k gives every backend the same indices and two backends' values differ by <= 2 E
    # (~4e-5 here: W is not scaled, sum |terms| reaches ~25; assert_close's default 1e-5 + 1.3e-6 |v|
    # held only by this CPU's rounding)
    err = encoder_err(x, W, b, None)
    assert_topk_decided(x.double() @ W.double() + b.double(), err, 7)
    results = {}
    for name in backends.implementations("topk_encode", "cpu"):
        with sk.use_backend(name):
            results[name] = topk_encode(x, W, b, 7)
    first = next(iter(results.values()))
    atol = 2 * float(err.gather(1, first.indices).max())
    for r in results.values():
        assert torch.equal(r.indices, first.indices)
        torch.testing.assert_close(r.values, first.values, rtol=0, atol=atol)
