#!/usr/bin/env bash
# Terminal 2: Node B (destination) in the foreground, once Node A is listening. SSH:
# localhost:2223, private link 10.0.0.2. Ctrl-C stops it. Needs ./testenv/setup.sh first.
# Thin front-end over `python -m pytest_katamaran.qemu.node start b --foreground`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$KATAMARAN_REPO/testenv}"
export PYTHONPATH="$KATAMARAN_REPO${PYTHONPATH:+:$PYTHONPATH}"
katamaran_python
exec "$KATAMARAN_PY" -m pytest_katamaran.qemu.node start b --foreground "$@"
