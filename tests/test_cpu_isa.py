"""The C++ CPU kernels' instruction sets: what was compiled, run-time dispatch, and every op per ISA.

The SIMD kernels are compiled once per instruction set (baseline x86-64, AVX2, AVX-512) and the copy
this CPU can run is chosen at run time (csrc/cpu/isa.h). Here:

- ``build_info()`` reports a portable build (no ``-march=native``, no AVX in the baseline objects);
- ``SPARSEKERN_CPU_ISA`` forces an ISA, and a bad or unsupported one is a clear error;
- every op agrees with a float64 reference on each ISA this CPU supports, within a bound derived from
  the precision of the computation, and the ops whose SIMD part is exact (selections, copies) give
  bit-identical results on every ISA;
- no function outside the per-ISA kernels uses an instruction a baseline x86-64 CPU lacks (objdump):
  a wheel must not die with SIGILL on an older CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from sparsekern import backends, ops
from sparsekern.sparse_acts import SparseActs

C = backends.native()
pytestmark = pytest.mark.skipif(C is None, reason="the C++ extension is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# unit roundoff of each dtype (half an ulp at 1)
U = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# absolute rounding error below the normal range: half the smallest subnormal (float16's is 2^-24)
ETA = {torch.float32: 2.0**-150, torch.float64: 2.0**-1075, torch.bfloat16: 2.0**-134,
       torch.float16: 2.0**-25}


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _isas() -> list[str]:
    if C is None:
        return []
    info = C.build_info()
    return [i for i in info["compiled_isas"] if i in info["supported_isas"]]


@contextlib.contextmanager
def _isa(name: str):
    before = C.set_cpu_isa(name)
    try:
        yield
    finally:
        C.set_cpu_isa(before)


def _bound(n_terms: int, sum_abs: torch.Tensor, ref: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """|computed - exact| bound for a sum of n_terms products accumulated in acc(dt), stored as dt.

    Any summation order (FMA or not) of n terms in precision u errs by at most gamma_n * sum|terms|,
    gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 3.1); the final store into dt adds a
    relative u_dt of the (already perturbed) value, or an absolute ETA_dt where it is subnormal (Higham
    2.1: fl(x) = x (1 + d) + e, |e| <= ETA). Inputs are exact in the accumulation type (they are dt values).
    """
    u = U[_acc(dt)]
    acc_err = n_terms * u / (1 - n_terms * u) * sum_abs + n_terms * ETA[_acc(dt)]
    if dt == _acc(dt):
        return acc_err
    return acc_err + U[dt] * (ref.abs() + acc_err) + ETA[dt]


# ---- build info and the ISA switch -------------------------------------------------------------

def test_build_info_reports_a_portable_build():
    info = C.build_info()
    assert set(info) >= {"isa", "compiled_isas", "supported_isas", "baseline_features", "dispatch",
                         "native_arch", "cxx_flags", "compiler", "isa_targets"}
    assert info["isa"] in info["compiled_isas"] and info["isa"] in info["supported_isas"]
    assert "baseline" in info["compiled_isas"] and "baseline" in info["supported_isas"]
    if info["native_arch"]:
        pytest.skip("built with SPARSEKERN_NATIVE_ARCH=1 (developer build): not portable by design")
    assert "-march" not in info["cxx_flags"] and "-mavx" not in info["cxx_flags"], info["cxx_flags"]
    assert not {"avx", "avx2", "fma", "f16c", "avx512f"} & set(info["baseline_features"]), info
    gcc = re.match(r"(\d+)\.", info["compiler"])  # GCC's __VERSION__ starts with its version
    if X86 and gcc and int(gcc.group(1)) >= 12:
        # GCC >= 12 on x86-64 (the project's toolchain): every copy is compiled
        assert info["dispatch"] and info["compiled_isas"] == ["baseline", "avx2", "avx512"], info
        assert set(info["isa_targets"]) == {"avx2", "avx512"}


def test_default_isa_is_the_best_this_cpu_runs():
    info = C.build_info()
    if os.environ.get("SPARSEKERN_CPU_ISA"):
        pytest.skip("SPARSEKERN_CPU_ISA is set for this run")
    assert info["isa"] == _isas()[-1], info


def test_set_cpu_isa_switches_and_refuses_what_it_cannot_run():
    for name in _isas():
        with _isa(name):
            assert C.build_info()["isa"] == name
    with pytest.raises(RuntimeError, match="not an instruction set"):
        C.set_cpu_isa("sse9")
    unrunnable = [i for i in ("avx2", "avx512") if i not in _isas()]
    for name in unrunnable:
        with pytest.raises(RuntimeError, match=f"set_cpu_isa={name}: this (CPU cannot run|build has no)"):
            C.set_cpu_isa(name)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=full)


def test_env_var_forces_the_baseline_kernels():
    code = (
        "import torch, sparsekern\n"
        "C = sparsekern.backends.native()\n"
        "v = torch.randn(3, 2); i = torch.tensor([[0, 1], [2, 3], [4, 0]]); W = torch.randn(5, 70)\n"
        "out = C.sparse_decode(v, i, W, None)\n"
        "assert torch.allclose(out, (v[..., None] * W[i]).sum(1), atol=1e-5)\n"
        "print(C.build_info()['isa'])\n"
    )
    proc = _run_python(code, SPARSEKERN_CPU_ISA="baseline")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "baseline"


def test_env_var_with_a_bad_isa_is_a_clear_error():
    code = ("import torch, sparsekern\n"
            "i = torch.zeros(1, 1, dtype=torch.long)\n"
            "sparsekern.backends.native().sparse_decode(torch.ones(1, 1), i, torch.ones(2, 8), None)\n")
    proc = _run_python(code, SPARSEKERN_CPU_ISA="avx9000")
    assert proc.returncode != 0
    assert "SPARSEKERN_CPU_ISA=avx9000 is not an instruction set" in proc.stderr, proc.stderr


# ---- every op on every ISA this CPU runs, against float64 --------------------------------------

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# (N, k, d, d_sae): tails past the vector width and tile; the last one takes the sorted "scatter" path
# (W_dec over 8 MiB, N*k >= d_sae; csrc/cpu/decode_plan.h)
DECODE_SHAPES = [(37, 13, 75, 50), (5, 1, 3, 4), (130, 40, 800, 5000)]


def _decode_inputs(shape, dt, seed=0):
    N, k, d, d_sae = shape
    g = _gen(seed)
    W = torch.randn(d_sae, d, generator=g).to(dt)
    v = torch.randn(N, k, generator=g).to(dt)
    idx = torch.randint(d_sae, (N, k), generator=g)
    if N > 0 and k > 1:
        idx[0, 1] = idx[0, 0]  # a repeated feature in one row
    b = torch.randn(d, generator=g).to(dt)
    go = torch.randn(N, d, generator=g).to(dt)
    return v, idx, W, b, go


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "N{}-k{}-d{}-dsae{}".format(*s))
def test_sparse_decode_ops_match_float64_on_every_isa(shape, dt):
    v, idx, W, b, go = _decode_inputs(shape, dt)
    N, k, d, d_sae = shape
    v64, W64, b64, go64 = v.double(), W.double(), b.double(), go.double()
    rows = W64[idx]  # [N, k, d]
    fwd_ref = (v64[..., None] * rows).sum(1) + b64
    fwd_bnd = _bound(k + 1, (v64.abs()[..., None] * rows.abs()).sum(1) + b64.abs(), fwd_ref, dt)
    val_ref = (go64[:, None, :] * rows).sum(-1)
    val_bnd = _bound(d, (go64.abs()[:, None, :] * rows.abs()).sum(-1), val_ref, dt)
    w_ref = torch.zeros(d_sae, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (v64[..., None] * go64[:, None, :]).reshape(-1, d))
    w_abs = torch.zeros(d_sae, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (v64.abs()[..., None] * go64.abs()[:, None, :]).reshape(-1, d))
    per_feature = int(torch.bincount(idx.reshape(-1), minlength=d_sae).max())
    w_bnd = _bound(per_feature, w_abs, w_ref, dt)
    for isa in _isas():
        with _isa(isa):
            got = {
                "forward": (C.sparse_decode(v, idx, W, b), fwd_ref, fwd_bnd),
                "backward_values": (C.sparse_decode_backward_values(go, idx, W), val_ref, val_bnd),
                "backward_weight": (C.sparse_decode_backward_weight(go, v, idx, d_sae), w_ref, w_bnd),
            }
        for name, (out, ref, bnd) in got.items():
            assert out.dtype == dt and out.shape == ref.shape, (isa, name)
            err = (out.double() - ref).abs()
            worst = int(torch.argmax(err - bnd))
            assert bool((err <= bnd).all()), (
                f"{isa} {name}: error {err.view(-1)[worst]:.3g} > bound {bnd.view(-1)[worst]:.3g}")


def _encoder_inputs(N, d_in, d_sae, dt, seed=1):
    g = _gen(seed)
    x = torch.randn(N, d_in, generator=g).to(dt)
    W = (torch.randn(d_in, d_sae, generator=g) / d_in**0.5).to(dt)
    be = (torch.randn(d_sae, generator=g) / 4).to(dt)
    bd = (torch.randn(d_in, generator=g) / 4).to(dt)
    return x, W, be, bd


def _pre_and_bound(x, W, be, bd):
    """float64 pre-activations and a bound on the kernel's fp32 (fp64) pre-activations' error: the
    centring x - b_dec rounds once (u |x - b_dec|), the GEMM sums d_in products (gamma_{d_in}) and the
    b_enc add rounds once, so |pre - pre64| <= gamma_{d_in + 2} (|x - b_dec| @ |W| + |b_enc|)."""
    xc = x.double() - bd.double()
    pre = xc @ W.double() + be.double()
    u = U[_acc(x.dtype)]
    n = x.shape[1] + 2
    bnd = n * u / (1 - n * u) * (xc.abs() @ W.double().abs() + be.double().abs()) + n * ETA[_acc(x.dtype)]
    return pre, bnd


# (N, d_in, d_sae): d_in and d_sae past the vector widths; 2100 columns span two 2048-column blocks
ENCODER_SHAPES = [(45, 40, 2100), (3, 7, 33)]


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ENCODER_SHAPES, ids=lambda s: "N{}-din{}-dsae{}".format(*s))
def test_encoders_match_float64_and_agree_bitwise_on_every_isa(shape, dt):
    N, d_in, d_sae = shape
    x, W, be, bd = _encoder_inputs(N, d_in, d_sae, dt)
    pre, bnd = _pre_and_bound(x, W, be, bd)
    k = min(7, d_sae)
    thr = torch.quantile(pre.float(), 0.9, dim=0).to(_acc(dt))  # ~10% of the features fire
    results = {}
    for isa in _isas():
        with _isa(isa):
            results[isa] = (C.topk_encode(x, W, be, bd, k, False), C.threshold_encode(x, W, be, thr, bd))
    first = next(iter(results.values()))
    for isa, (topk, thresh) in results.items():
        # the SIMD parts (centring, scans) are exact: every ISA selects the same features, same values
        for a, b in zip(topk + thresh, first[0] + first[1]):
            assert torch.equal(a, b), f"{isa} differs from {next(iter(results))}"
    (values, idx), (tv, ti, l0) = first
    # top-k: the chosen features' pre-activations, stored in dt (+ u_dt relative)
    u_out, eta_out = (0.0, 0.0) if dt == _acc(dt) else (U[dt], ETA[dt])
    chosen, chosen_bnd = pre.gather(1, idx), bnd.gather(1, idx)
    out_bnd = chosen_bnd + u_out * (chosen.abs() + chosen_bnd) + eta_out
    assert bool(((values.double() - chosen).abs() <= out_bnd).all())
    # ... and no feature left out is better beyond rounding: max over the rest of (pre - bnd) can't
    # exceed min over the chosen of (pre + bnd)
    rest = torch.ones_like(pre, dtype=torch.bool).scatter_(1, idx, False)
    lo_rest = torch.where(rest, pre - bnd, torch.tensor(-torch.inf, dtype=torch.float64)).amax(1)
    hi_chosen = (chosen + chosen_bnd).amin(1)
    assert bool((lo_rest <= hi_chosen).all())
    # threshold: a feature clearly above its threshold fires, one clearly below does not
    fired = torch.zeros_like(pre, dtype=torch.bool)
    for r in range(N):
        fired[r, ti[r, : l0[r]]] = True
    t64 = thr.double()
    assert not bool((fired & (pre + bnd <= t64)).any()), "a feature below its threshold fired"
    assert not bool((~fired & (pre - bnd > t64)).any()), "a feature above its threshold did not fire"
    for r in range(N):
        p, b = pre[r, ti[r, : l0[r]]], bnd[r, ti[r, : l0[r]]]
        assert bool(((tv[r, : l0[r]].double() - p).abs() <= b + u_out * (p.abs() + b) + eta_out).all())


@pytest.mark.parametrize("absolute", [False, True])
def test_gram_topk_matches_float64_and_agrees_bitwise_on_every_isa(absolute):
    W = torch.randn(300, 24, generator=_gen(2))
    k = 5
    results = {}
    for isa in _isas():
        with _isa(isa), backends.use_backend("cpp"):
            results[isa] = ops.gram_topk(W, k, absolute=absolute, block=64)
    first = next(iter(results.values()))
    for isa, (v, i) in results.items():
        assert torch.equal(v, first[0]) and torch.equal(i, first[1]), isa
    G = W.double() @ W.double().T
    # one GEMM of d products per entry: gamma_d * (|W| @ |W|^T)
    d = W.shape[1]
    bnd = d * U[torch.float32] / (1 - d * U[torch.float32]) * (W.double().abs() @ W.double().abs().T) \
        + d * ETA[torch.float32]
    v, i = first
    assert bool(((v.double() - G.gather(1, i)).abs() <= bnd.gather(1, i)).all())
    key = G.abs() if absolute else G
    key = key.clone().fill_diagonal_(-torch.inf)
    rest = torch.ones_like(key, dtype=torch.bool).scatter_(1, i, False)
    rest.fill_diagonal_(False)
    lo_rest = torch.where(rest, key - bnd, torch.tensor(-torch.inf, dtype=torch.float64)).amax(1)
    assert bool((lo_rest <= (key.gather(1, i) + bnd.gather(1, i)).amin(1)).all())


def test_feature_topk_update_equals_the_reference_on_every_isa():
    g = _gen(3)
    d_sae, k, rows, kc = 60, 4, 50, 6
    vals = torch.rand(rows, kc, generator=g) - 0.2  # some entries <= 0: not candidates
    idx = torch.randint(d_sae, (rows, kc), generator=g)
    loc = torch.stack([torch.arange(rows), torch.zeros(rows, dtype=torch.long)], 1)
    acts = SparseActs(vals, idx)
    with backends.use_backend("ref"):
        ref = ops.feature_topk_update(ops.FeatureTopKState.empty(d_sae, k), acts, loc)
    for isa in _isas():
        with _isa(isa), backends.use_backend("cpp"):
            got = ops.feature_topk_update(ops.FeatureTopKState.empty(d_sae, k), acts, loc)
        assert torch.equal(got.values, ref.values) and torch.equal(got.locations, ref.locations), isa


# ---- the built library: no AVX outside the per-ISA kernels -------------------------------------

# instructions a baseline x86-64 CPU (SSE2) may lack: VEX/EVEX (v* mnemonics, ymm/zmm/mask registers)
# and the x86-64-v2/v3 scalar extensions. (tzcnt is not listed: GCC emits `rep bsf` for ctz, which
# objdump prints as tzcnt and older CPUs run as bsf.)
_NEWER = re.compile(r"^\s*[0-9a-f]+:\s+(v(?!err|erw)\w+|popcnt|lzcnt|andn|bextr|blsi|blsmsk|blsr|bzhi|"
                    r"pdep|pext|mulx|rorx|sarx|shlx|shrx|movbe|crc32\w*|pshufb|ptest|pcmpgtq|pminsd|"
                    r"pmaxsd|pminud|pmaxud|pmulld|roundss|roundsd|roundps|roundpd|dpps|blendv\w*|pblendvb)\b"
                    r"|%[yz]mm|%k[0-7]\b")
_ISA_FN = re.compile(r"::isa_avx(2|512)::")


def _functions_with_newer_instructions(so: str) -> dict[str, int]:
    """Function (demangled) -> count of its instructions that need more than x86-64 baseline."""
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", so], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    found: dict[str, int] = {}
    fn = ""
    for line in dis.splitlines():
        if line.endswith(">:"):
            fn = line[line.index("<") + 1: -2]
        elif _NEWER.search(line):
            found[fn] = found.get(fn, 0) + 1
    return found


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with objdump only")
def test_no_instruction_past_baseline_outside_the_isa_kernels():
    info = C.build_info()
    if info["native_arch"] or not info["dispatch"]:
        pytest.skip(f"not a dispatching build: {info}")
    so = C.__file__
    found = _functions_with_newer_instructions(so)
    outside = {f: n for f, n in found.items() if not _ISA_FN.search(f)}
    assert not outside, f"{len(outside)} functions outside sparsekern::isa_avx2/avx512 need more than " \
                        f"x86-64 baseline, e.g. {sorted(outside.items())[:5]}"
    # and the AVX2 copies really are AVX2 + FMA code
    avx2 = {f for f in found if "::isa_avx2::" in f}
    assert any("decode_forward" in f for f in avx2) and any("scan_topk" in f for f in avx2), sorted(avx2)[:10]
    dis_fma = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                             timeout=600, check=True).stdout
    assert "vfmadd" in dis_fma and "%ymm" in dis_fma
