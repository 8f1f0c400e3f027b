#!/usr/bin/env bash
# Set up SynthBrain in ./.venv (idempotent). Usage: scripts/setup.sh [dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {  # Debian packages, only the missing ones
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "setup: please install ${missing[*]}" >&2; return 0; }
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
# Off-screen rendering for meshes (VTK through EGL / Mesa); the e2e test drives Debian's chromium.
apt_install libegl1 libgl1 libgl1-mesa-dri libxrender1
if [ "${1:-}" = dev ]; then apt_install chromium fonts-liberation; fi
if [ ! -x .venv/bin/python ]; then
  $PY -m venv .venv 2>/dev/null || { apt_install python3-venv; $PY -m venv .venv; }
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${1:-}" = dev ]; then
  python -m pip install -q -r requirements-dev.txt -e .
else
  python -m pip install -q -r requirements.txt -e .
fi
# pytorch-fast-transformers, the VQ transformer's engine: a source-only package (0.4.0) that compiles
# C++ at install (~8 min on 2 cores; pip caches the wheel, so later runs take seconds). Its setup.py
# imports torch (hence --no-build-isolation) and builds CUDA kernels whenever an nvcc runs, which
# fails against a CPU-only torch: nvcc is then hidden from PATH. Without it SynthBrain uses its
# plain-torch engine (same weights); SYNTHBRAIN_SKIP_FAST_TRANSFORMERS=1 skips the build.
if [ "${SYNTHBRAIN_SKIP_FAST_TRANSFORMERS:-0}" != 1 ] && ! python -c "import fast_transformers.causal_product" 2>/dev/null; then
  command -v g++ >/dev/null || apt_install g++
  python -c "import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    || apt_install python3-dev
  ft_path=$PATH
  if ! python -c "import torch; raise SystemExit(torch.version.cuda is None)"; then
    ft_path=$(printf '%s\n' "$PATH" | tr ':' '\n' | while read -r d; do if [ -n "$d" ] && [ ! -x "$d/nvcc" ]; then printf '%s:' "$d"; fi; done)
    ft_path=${ft_path%:}
  fi
  echo "setup: building pytorch-fast-transformers (first time ~8 min)" >&2
  PATH="$ft_path" python -m pip install -q --no-build-isolation "pytorch-fast-transformers==0.4.0" \
    || echo "setup: pytorch-fast-transformers did not build; the VQ model runs on its plain-torch engine" >&2
fi
