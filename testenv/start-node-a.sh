#!/usr/bin/env bash
# Terminal 1: Node A (source) in the foreground. SSH: localhost:2222, private link
# 10.0.0.1 (listens for Node B). Ctrl-C stops it. Needs ./testenv/setup.sh first.
# Thin front-end over `python -m pytest_katamaran.qemu.node start a --foreground`.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$KATAMARAN_REPO/testenv}"
export PYTHONPATH="$KATAMARAN_REPO${PYTHONPATH:+:$PYTHONPATH}"
katamaran_python
exec "$KATAMARAN_PY" -m pytest_katamaran.qemu.node start a --foreground "$@"
