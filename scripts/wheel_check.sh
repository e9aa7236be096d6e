#!/usr/bin/env bash
# Issue 13 (pip-installable for real): build the wheel, install it NON-editable into a fresh virtual
# environment that reuses the installed torch and other dependencies, and use it there from outside the
# repository: import, SAE save/load round trip, sparsekern.toy.load() from the shipped weights,
# `sparsekern demo --quick` and `sparsekern bench --quick`; and that it was compiled portably (no
# -march=native: it must run on any x86-64 CPU, see csrc/cpu/isa.h).
#
#   bash scripts/wheel_check.sh            # step lines as it goes, a summary line at the end
#   bash scripts/wheel_check.sh --quiet    # only the summary on stdout (the steps go to stderr on failure)
#
# The wheel is built in-tree (`pip wheel --no-build-isolation --no-deps .`), so build_ext reuses the objects
# of the editable install in build/temp.* (setup.py keeps them there): it only links (10-20 s, not 2-4 min).
# The venv has no system site-packages; a .pth file in it appends the installing Python's site-packages
# folder(s) to sys.path. A path line in a .pth is not processed as a site dir, so the .pth files in there
# (the editable install's finder) are not run and the repository's sparsekern is not importable; checked.
# Nothing outside the temporary folder changes except build/ (gitignored) and the sparsekern.egg-info that
# setuptools writes beside setup.py (removed again unless it was there before).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QUIET=0
[ "${1:-}" = "--quiet" ] && QUIET=1

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sparsekern-wheel.XXXXXX")
had_egg_info=0
[ -e sparsekern.egg-info ] && had_egg_info=1
cleanup() {
  rm -rf "$tmp"
  [ "$had_egg_info" = 1 ] || rm -rf "$ROOT/sparsekern.egg-info"
}
trap cleanup EXIT
log="$tmp/steps.log"
: >"$log"
say() {
  echo "[wheel] $*" >>"$log"
  [ "$QUIET" = 1 ] || echo "[wheel] $*"
}
fail() {
  [ "$QUIET" = 1 ] && cat "$log" >&2
  echo "[wheel] FAILED: $*" >&2
  exit 1
}
# run_logged NAME CMD...: run CMD with its output in $tmp/NAME.log; on failure show the log's tail and fail
run_logged() {
  local name=$1
  shift
  "$@" >"$tmp/$name.log" 2>&1 || { tail -40 "$tmp/$name.log" >&2; fail "$name ($*)"; }
}
start=$SECONDS

# ---- 1. the wheel ----------------------------------------------------------------------------------
# stale build/lib and build/bdist files would end up in the wheel (setuptools never deletes them there)
rm -rf build/lib.* build/bdist.*
t=$SECONDS
run_logged build "$PY" -m pip wheel --disable-pip-version-check --no-cache-dir --no-build-isolation --no-deps . -w "$tmp/dist"
build_s=$((SECONDS - t))
whl=$(ls "$tmp"/dist/sparsekern-*.whl 2>/dev/null | head -1)
[ -n "$whl" ] || fail "pip wheel wrote no sparsekern-*.whl"
say "built $(basename "$whl") in ${build_s}s"

# its contents: the compiled extension, the shipped weights and every tracked file of the package
contents=$("$PY" - "$whl" "$ROOT" <<'EOF'
import os
import subprocess
import sys
import zipfile

whl, root = sys.argv[1], sys.argv[2]
names = set(zipfile.ZipFile(whl).namelist())
errors = []
if "-none-any" in os.path.basename(whl):
    errors.append(f"{os.path.basename(whl)} is a pure-Python wheel (no compiled extension)")
if not [n for n in names if n.startswith("sparsekern/_C") and n.endswith(".so")]:
    errors.append("no compiled sparsekern/_C*.so")
required = ["sparsekern/toy/weights/model.safetensors", "sparsekern/toy/weights/REPORT.json",
            "sparsekern/toy/weights/model_cfg.json", "sparsekern/toy/weights/vocab.json"]
for sae in ("resid_sae", "mlp0_transcoder"):  # the SAELens-format SAE folders sparsekern.toy.load() reads
    required += [f"sparsekern/toy/weights/{sae}/{f}" for f in ("cfg.json", "sae_weights.safetensors")]
# every file of the package in the source tree (git-tracked ones when this is a checkout)
try:
    tracked = subprocess.run(["git", "-C", root, "ls-files", "-z", "sparsekern"], check=True,
                             capture_output=True).stdout.decode().split("\0")
except (OSError, subprocess.CalledProcessError):
    tracked = [os.path.relpath(os.path.join(d, f), root)
               for d, _, fs in os.walk(os.path.join(root, "sparsekern"))
               for f in fs if "__pycache__" not in d and not f.endswith((".so", ".pyc"))]
required += [p for p in tracked if p and os.path.exists(os.path.join(root, p))]
missing = sorted(set(r for r in required if r not in names))
if missing:
    errors.append(f"missing from the wheel: {missing}")
if errors:
    sys.exit("; ".join(errors))
weights = [n for n in names if n.startswith("sparsekern/toy/weights/")]
print(f"{len(names)} files, {len(weights)} toy weight files, _C extension")
EOF
) || fail "wheel contents"
say "wheel contents ok: $contents"

# ---- 2. a fresh venv reusing the installed torch and dependencies ------------------------------------
venv="$tmp/venv"
run_logged venv "$PY" -m venv --without-pip "$venv"
VPY="$venv/bin/python"
# the installing Python's import folders (site-packages with torch, transformer_lens, numpy, pip, ...; also
# folders its own .pth files added) except the standard library and the repository: one path per line
"$PY" - "$ROOT" <<'EOF' >"$tmp/site_dirs" || fail "listing the installing Python's site-packages"
import os
import sys
import sysconfig

root = os.path.realpath(sys.argv[1])
std = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
std |= {os.path.join(s, "lib-dynload") for s in std}
dirs = []
for p in sys.path:  # "" (the cwd) and the repository are left out
    r = os.path.realpath(p)
    if p and os.path.isdir(r) and r not in std and r != root and r not in dirs:
        dirs.append(r)
print("\n".join(dirs))
EOF
venv_site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$tmp/site_dirs" "$venv_site/_sparsekern_wheel_check_deps.pth"
mkdir -p "$tmp/run"
cd "$tmp/run"  # outside the repository: its sparsekern/ folder must not be importable from the cwd
cat >"$tmp/clean_venv.py" <<'EOF'
import importlib.util
import sys

assert sys.prefix != sys.base_prefix, "not a venv"
finders = [f for f in sys.meta_path if "editable" in repr(f).lower()]
assert not finders, f"an editable install's finder is active in the venv: {finders}"
spec = importlib.util.find_spec("sparsekern")
assert spec is None, f"sparsekern is importable before the wheel is installed: {spec.origin}"
import torch  # noqa: E402,F401  (reused from the installing Python)
import transformer_lens  # noqa: E402,F401
print("venv before install: no sparsekern, no editable finder; torch", torch.__version__)
EOF
run_logged clean_venv "$VPY" "$tmp/clean_venv.py"
say "$(tail -1 "$tmp/clean_venv.log")"
run_logged install "$VPY" -m pip install --disable-pip-version-check --no-cache-dir --no-index --no-deps --ignore-installed "$whl"
say "installed the wheel into a fresh venv (deps from: $(tr '\n' ' ' <"$tmp/site_dirs"))"

# the wheel's compile flags (issue 19): portable, so that it runs on any x86-64 CPU torch supports. The
# extension reports them (sparsekern._C.build_info(), csrc/cpu/isa.h): no -march/-mavx* flag, no AVX in the
# objects outside the per-ISA kernels, and on x86-64 every ISA copy compiled for run-time dispatch.
cat >"$tmp/flags.py" <<'EOF'
import platform
import sys

import sparsekern

C = sparsekern.backends.native()
assert C is not None, "the wheel's C++ extension did not load"
info = C.build_info()
errors = []
if info["native_arch"]:
    errors.append("built with SPARSEKERN_NATIVE_ARCH=1 (-march=native)")
for flag in ("-march", "-mtune=native", "-mavx", "-mfma", "-mf16c"):
    if flag in info["cxx_flags"]:
        errors.append(f"the compile flags hold {flag}")
newer = sorted(set(info["baseline_features"]) & {"avx", "avx2", "fma", "f16c", "avx512f"})
if newer:
    errors.append(f"the objects outside the per-ISA kernels were compiled with {newer}")
x86 = platform.machine().lower() in ("x86_64", "amd64")
if x86 and info["compiled_isas"] != ["baseline", "avx2", "avx512"]:
    errors.append(f"no run-time dispatch: kernels only for {info['compiled_isas']} (needs GCC >= 12)")
if errors:
    sys.exit("the wheel is not portable: " + "; ".join(errors) + f"\nbuild_info: {info}")
print(f"portable build: flags '{info['cxx_flags']}', kernels for {'/'.join(info['compiled_isas'])}, "
      f"this CPU runs {info['isa']}")
EOF
run_logged flags "$VPY" "$tmp/flags.py"
say "$(tail -1 "$tmp/flags.log")"

# ---- 3. use it there ---------------------------------------------------------------------------------
SK="$venv/bin/sparsekern"
[ -x "$SK" ] || fail "the wheel installed no sparsekern console script"
t=$SECONDS
cat >"$tmp/use.py" <<'EOF'
import os
import sys
import tempfile

import torch

import sparsekern
import sparsekern.toy

venv = os.path.realpath(os.environ["SPARSEKERN_VENV"])
where = os.path.realpath(sparsekern.__file__)
assert where.startswith(venv + os.sep), f"sparsekern imported from {where}, not from the venv {venv}"
assert not any("__editable__" in m for m in sys.modules), "an editable finder was imported"
assert "cpp" in sparsekern.backends(), f"the wheel's C++ extension did not load: {sparsekern.backends()}"

torch.manual_seed(0)
sae = sparsekern.TopKSAE(sparsekern.TopKSAEConfig(d_in=16, d_sae=64, k=4))
x = torch.randn(8, 16)
with tempfile.TemporaryDirectory() as d:
    sae.save_model(d)
    back = sparsekern.SAE.load_from_disk(d)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), back.encode(x)), "encode differs after save_model/load_from_disk"
        assert torch.equal(sae(x), back(x)), "SAE output differs after save_model/load_from_disk"

assert os.path.realpath(sparsekern.toy.WEIGHTS_DIR).startswith(venv + os.sep), sparsekern.toy.WEIGHTS_DIR
model, saes = sparsekern.toy.load()
assert set(saes) == {"resid_sae", "mlp0_transcoder"}, sorted(saes)
with torch.no_grad():
    logits = model(torch.arange(min(8, model.cfg.d_vocab)).unsqueeze(0))
assert torch.isfinite(logits).all()
print(f"import from the venv ({where}), backends {sparsekern.backends()}, SAE round trip, "
      f"toy.load() ({len(saes)} SAEs) ok")
EOF
run_logged use env SPARSEKERN_VENV="$venv" "$VPY" "$tmp/use.py"
say "$(tail -1 "$tmp/use.log")"
api_s=$((SECONDS - t))

# demo: required once the build has it (`sparsekern demo` is new; until then say so and go on)
t=$SECONDS
if help=$("$SK" demo --help 2>&1); then
  args=(demo --quick --out "$tmp/demo")
  grep -q -- "--no-progress" <<<"$help" && args+=(--no-progress)
  grep -q -- "--no-png" <<<"$help" && args+=(--no-png)  # PNGs need Chromium; the HTML/JSON are checked
  run_logged demo "$SK" "${args[@]}"
  [ -n "$(ls -A "$tmp/demo" 2>/dev/null)" ] || fail "sparsekern demo --quick wrote nothing to $tmp/demo"
  if grep -q "demo.json" <<<"$help" && [ ! -s "$tmp/demo/demo.json" ]; then
    fail "sparsekern demo --quick wrote no demo.json (its --help promises one)"
  fi
  demo_msg="demo --quick ok in $((SECONDS - t))s ($(ls "$tmp/demo" | tr '\n' ' '))"
elif grep -q "invalid choice" <<<"$help" && ! "$VPY" -c "import sparsekern.demo" 2>/dev/null; then
  demo_msg="demo: not available in this build"
else
  echo "$help" >&2
  fail "sparsekern demo --help"
fi
say "$demo_msg"

t=$SECONDS
run_logged bench "$SK" bench --quick --ops topk_encode --no-progress --out "$tmp/bench"
ls "$tmp"/bench/latest-*.json >/dev/null 2>&1 || fail "sparsekern bench --quick wrote no latest-*.json to $tmp/bench"
say "bench --quick --ops topk_encode ok in $((SECONDS - t))s"

summary="ok in $((SECONDS - start))s: $(basename "$whl") (built in ${build_s}s; $contents; portable flags) installed non-editable in a fresh venv; import, SAE round trip, toy.load() (${api_s}s); ${demo_msg%% (*}; bench --quick"
if [ "$QUIET" = 1 ]; then echo "$summary"; else echo "[wheel] $summary"; fi
