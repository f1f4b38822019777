#!/usr/bin/env bash
# The test suite: installs on first use (see setup.sh), then pytest over tests/.
#   ./test.sh            everything (what CI runs)
#   ./test.sh --quick    the tiny-model tier, for the edit-test loop: no embedded model, torchrun or sweep
# Other arguments go to pytest (./test.sh -k dpo, ./test.sh --quick -x).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh test
quick=()
if [ "${1:-}" = --quick ]; then quick=(-m "not slow"); shift; fi
exec .venv/bin/python -m pytest -q "${quick[@]}" "$@" tests
