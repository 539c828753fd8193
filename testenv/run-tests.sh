#!/usr/bin/env bash
# The project's test run (what CI runs): smoke + plugin + integration (real QEMU on this
# machine), then the e2e suite on the two-node QEMU lab (`--nodes=qemu`): real live
# migrations driven over SSH, NBD and shared storage, zero-drop ping. Extra arguments go
# to both runs. E2E_SESSION_TIMEOUT caps the e2e run (pytest-timeout; default 30 min).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -n 2 -p no:cacheprovider -rs "$@"
python3 -m pytest tests/e2e --nodes=qemu -p no:cacheprovider -rs \
    --session-timeout="${E2E_SESSION_TIMEOUT:-1800}" "$@"
