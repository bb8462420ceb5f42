#!/usr/bin/env bash
# Set up a virtual environment (if absent) with the pinned versions and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# libtpu (a ~210 MB wheel, ~700 MB installed; jax and jaxlib unchanged) lets tests/test_aot_tpu.py compile for a
# TPU topology on this host; where it cannot be installed (no network, disk) that test is skipped and says so.
timeout 900 .venv/bin/python -m pip install -q -c constraints.txt -e ".[tpu-aot]" ||
  echo "tools/test.sh: libtpu could not be installed; tests/test_aot_tpu.py will be skipped" >&2
# Two workers (one per core; a test file stays on one worker so its module fixtures are built once) and the
# slowest tests listed at the end, to keep the suite inside its time budget.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=30 tests "$@"
