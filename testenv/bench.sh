#!/usr/bin/env bash
# The benchmark (not part of the test run): katamaran vs the bare QMP sequence over a grid
# of disk/RAM sizes and loads; JSON and pictures into benchmarks/results/ (see README).
# Flags go to `python -m pytest_katamaran.bench`: --quick, --rounds N, --out DIR, --plot-only JSON.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
katamaran_python
exec "$KATAMARAN_PY" -m pytest_katamaran.bench "$@"
