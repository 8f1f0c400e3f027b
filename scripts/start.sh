#!/usr/bin/env bash
# Set up (first run) and start the viewer on the shipped default model: http://localhost:8501
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/streamlit run viewer/app.py --server.address "${SYNTHBRAIN_HOST:-localhost}" --server.port "${SYNTHBRAIN_PORT:-8501}" "$@"
