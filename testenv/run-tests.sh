#!/usr/bin/env bash
# The project's test run (what CI runs): smoke + plugin + integration (real QEMU on this
# machine), then the e2e suite on the two-node QEMU lab (`--nodes=qemu`): real live
# migrations driven over SSH, NBD and shared storage, zero-drop ping. Extra arguments go
# to both runs. E2E_SESSION_TIMEOUT caps the e2e run (pytest-timeout; default 30 min).
# Runs the checkout's .venv python (./testenv/install-deps.sh makes it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
katamaran_python
"$KATAMARAN_PY" -m pytest -n 2 --dist loadgroup -p no:cacheprovider -rs "$@"
"$KATAMARAN_PY" -m pytest tests/e2e --nodes=qemu -p no:cacheprovider -rs \
    --session-timeout="${E2E_SESSION_TIMEOUT:-1800}" "$@"
