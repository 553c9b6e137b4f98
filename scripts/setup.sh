#!/usr/bin/env bash
# Create (or update) the project's virtual environment: CPU torch first, then everything else.
# Usage: scripts/setup.sh [VENV_DIR]. Re-running is cheap: it exits early when pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # A plain `torch` requirement pulls a multi-GB CUDA build; take a CPU build instead:
  # a local CPU wheel where the machine keeps one (pip's find-links dir), else PyTorch's CPU index.
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-*+cpu-"$tag"-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$wheel" ]; then
    echo "setup: installing local CPU torch wheel $(basename "$wheel")"
    pip install -q "$wheel"
  else
    echo "setup: installing CPU torch from the PyTorch CPU index"
    pip install -q "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# DeepSpeed's setup.py imports torch, so it must build against the torch above (no isolation),
# with its C++/CUDA ops compiled lazily at first use rather than at install time.
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  pip install -q setuptools wheel
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.15"
fi
pip install -q -e ".[test]"
# the labelling page's browser test: Debian chromium + playwright (never playwright's own download)
bash scripts/install_browser.sh "$VENV"
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "setup: environment ready in $VENV"
