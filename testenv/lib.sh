# shellcheck shell=bash
# Sourced by every script under testenv/ and by .ci/run: where the checkout is, and which
# python runs katamaran and its test harness.
# Why: Debian 12 and Ubuntu 24.04 refuse `pip install` into their system Python (PEP 668,
# externally-managed-environment), so install-deps.sh installs the project into a virtual
# environment, .venv in the checkout, made by the distribution's `python3 -m venv`. Every
# script runs that venv's python by path: nobody has to activate anything.
# KATAMARAN_PYTHON overrides the choice (the tests run the scripts with the python under test).

KATAMARAN_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KATAMARAN_VENV="$KATAMARAN_REPO/.venv"
# The interpreter install-deps.sh builds the venv from: the distribution's, not whatever
# python3 comes first on PATH (a pyenv or conda python would hide the PEP 668 problem).
KATAMARAN_BASE_PYTHON="${KATAMARAN_BASE_PYTHON:-/usr/bin/python3}"

# Set KATAMARAN_PY to the python to run, or exit 1 naming the step that makes it.
katamaran_python() {
    if [[ -n "${KATAMARAN_PYTHON:-}" ]]; then
        KATAMARAN_PY="$KATAMARAN_PYTHON"
    elif [[ -x "$KATAMARAN_VENV/bin/python" ]]; then
        KATAMARAN_PY="$KATAMARAN_VENV/bin/python"
    else
        echo "$KATAMARAN_VENV/bin/python not found. Run ./testenv/install-deps.sh (as root) first." >&2
        exit 1
    fi
}
