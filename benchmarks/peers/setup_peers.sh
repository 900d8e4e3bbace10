#!/usr/bin/env bash
# Creates the peers' virtual environments OUTSIDE the repository; their pins
# conflict with the project venv (the DLN reference pins openai 1.14).
#   bash benchmarks/peers/setup_peers.sh [ROOT]      (default ROOT=/work/peers-venv)
# ROOT/dln  : the DLN reference code's requirements minus torch, tensorboard and
#             scipy (unused by DLN-1), plus httpx<0.28 (openai 1.14 breaks with
#             newer httpx) and tensorboardX (stands in for torch's SummaryWriter).
# ROOT/dspy : dspy with optuna (MIPROv2 needs it).
# Never installs torch: the global pip constraint and the explicit list keep it out.
set -euo pipefail
ROOT="${1:-/work/peers-venv}"
PY="${PYTHON:-python3.11}"

make_venv() {
  local dir="$1"; shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/pip" install --quiet "$@"
  if "$dir/bin/python" -c "import torch" 2>/dev/null; then
    echo "error: torch ended up in $dir" >&2; exit 1
  fi
}

make_venv "$ROOT/dln" \
  "openai==1.14.1" "httpx<0.28" "jinja2==3.1.4" "tenacity==8.2.2" "click==8.1.3" \
  "termcolor==2.3.0" "tiktoken==0.4.0" "requests==2.31.0" "packaging==23.1" \
  numpy pyyaml tqdm transformers datasets tensorboardX
make_venv "$ROOT/dspy" "dspy==3.4.1" "optuna"
echo "peers venvs ready under $ROOT"
