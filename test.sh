#!/usr/bin/env bash
# The test suite: installs on first use (see setup.sh), then pytest over tests/.
#   ./test.sh            everything (what CI runs)
#   ./test.sh --quick    the tiny-model tier, for the edit-test loop: no embedded model, torchrun or sweep
# Other arguments go to pytest (./test.sh -k dpo, ./test.sh --quick -x; -n 0 for one process, e.g. --pdb).
# Tests run in one worker per core (pytest-xdist), each torch on one thread: two workers each using
# every core would slow each other about 5x.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh test
quick=()
if [ "${1:-}" = --quick ]; then quick=(-m "not slow"); shift; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n auto "${quick[@]}" "$@" tests
