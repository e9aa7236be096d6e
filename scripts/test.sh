#!/usr/bin/env bash
# Set everything up, run the C++ unit tests (ctest) and then the whole pytest suite.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
bash scripts/setup.sh

mkdir -p build
if command -v cmake >/dev/null; then
  echo "[test] C++ unit tests (cmake + ctest)"
  prefix=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython_EXECUTABLE="$(command -v "$PY")" >build/cmake-configure.log 2>&1 \
    || { cat build/cmake-configure.log; exit 1; }
  cmake --build build/cmake -j"$(nproc)" >build/cmake-build.log 2>&1 || { tail -50 build/cmake-build.log; exit 1; }
  ctest --test-dir build/cmake --output-on-failure
else
  echo "[test] cmake not found: skipping the C++ unit tests"
fi

# Headless Chromium renders the bench's HTML page in tests/test_html_report.py (which skips without it).
# Install Debian's `chromium` with apt where we may (root, or sudo without a password); one line either
# way, and never fail the test run for it (about 30 s and 100 MB of downloads on Debian 12).
install_chromium() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get"
  $apt install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { $apt update -qq >/dev/null 2>&1 && $apt install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }
}
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  if install_chromium && command -v chromium >/dev/null; then
    echo "[test] installed chromium with apt (headless browser for tests/test_html_report.py)"
  else
    echo "[test] could not install chromium with apt: tests/test_html_report.py will skip its browser checks"
  fi
fi

# Issue 13: the wheel installs and works on its own (scripts/wheel_check.sh); after setup.sh's editable
# build it only links the extension: 1.5-2.5 minutes on 2 cores (the demo is most of it). Its step log is
# printed only when it fails.
if ! wheel_summary=$(bash scripts/wheel_check.sh --quiet); then
  echo "[test] wheel check FAILED: the wheel does not build, install or work outside the repo (log above;" \
    "rerun: bash scripts/wheel_check.sh)" >&2
  exit 1
fi
echo "[test] wheel check (build the wheel, install it into a fresh venv, use it there): $wheel_summary"

echo "[test] pytest"
exec "$PY" -m pytest tests/ -q -p no:cacheprovider "$@"
