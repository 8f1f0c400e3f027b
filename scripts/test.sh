#!/usr/bin/env bash
# Set up (first run) and run the whole test suite on CPU, browser end-to-end test included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/audit.sh  # pip-audit of the pinned dependencies; a finding not allow-listed fails CI
export MPLBACKEND=Agg PYVISTA_OFF_SCREEN=true VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow
exec .venv/bin/python -m pytest -q "$@"
