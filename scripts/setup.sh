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
