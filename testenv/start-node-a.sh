#!/usr/bin/env bash
# Terminal 1: Node A (source) in the foreground. SSH: localhost:2222, private link
# 10.0.0.1 (listens for Node B). Ctrl-C stops it. Needs ./testenv/setup.sh first.
# Thin front-end over `python3 -m pytest_katamaran.node_vm start a --foreground`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$here}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m pytest_katamaran.node_vm start a --foreground "$@"
