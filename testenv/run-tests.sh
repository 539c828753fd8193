#!/usr/bin/env bash
# The project's test run (what CI runs): smoke + plugin + integration (real QEMU on this
# machine) on 2 workers; then, one at a time, the modules that boot Debian-kernel lab node
# VMs (marker `lab_nodes`: a node plus its nested guest takes a whole core, and two at once
# starved each other's timing here); then the e2e suite on the two-node QEMU lab
# (`--nodes=qemu`): real live migrations driven over SSH, NBD and shared storage,
# zero-drop ping. Extra arguments go to every run (a run they leave empty counts as
# passed). E2E_SESSION_TIMEOUT caps the e2e run (pytest-timeout; default 30 min).
# Runs the checkout's .venv python (./testenv/install-deps.sh makes it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
katamaran_python
pytest_run() {  # exit status 5 (no test selected by the extra arguments) is no failure
    local rc=0
    "$KATAMARAN_PY" -m pytest "$@" || rc=$?
    [[ $rc -eq 0 || $rc -eq 5 ]] || return "$rc"
}
pytest_run -n 2 -m "not lab_nodes" -p no:cacheprovider -rs --durations=10 "$@"
pytest_run -m lab_nodes -p no:cacheprovider -rs --durations=15 "$@"
"$KATAMARAN_PY" -m pytest tests/e2e --nodes=qemu -p no:cacheprovider -rs --durations=10 \
    --session-timeout="${E2E_SESSION_TIMEOUT:-1800}" "$@"
