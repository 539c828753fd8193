#!/usr/bin/env bash
# Smoke tests (TESTING.md, "Running Smoke Tests"): ./testenv/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec python3 -m pytest tests/smoke "$@"
