#!/usr/bin/env bash
# The project's test run (what CI runs): smoke + plugin + integration (real QEMU on this
# machine), then the e2e folder's host-side tests. The two-node zero-drop runs need
# `--nodes=qemu` (pass it as an argument); they do not pass in this TCG lab yet (README).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -n 2 -p no:cacheprovider -rs "$@"
python3 -m pytest tests/e2e -p no:cacheprovider -rs "$@"
