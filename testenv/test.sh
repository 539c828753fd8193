#!/usr/bin/env bash
# Smoke tests (TESTING.md, "Running Smoke Tests"): ./testenv/test.sh [pytest args...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
katamaran_python
exec "$KATAMARAN_PY" -m pytest tests/smoke "$@"
