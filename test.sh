#!/usr/bin/env bash
# The test suite: installs on first use (see setup.sh), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh test
exec .venv/bin/python -m pytest -q "$@" tests
