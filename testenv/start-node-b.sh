#!/usr/bin/env bash
# Terminal 2: Node B (destination) in the foreground, once Node A is listening. SSH:
# localhost:2223, private link 10.0.0.2. Ctrl-C stops it. Needs ./testenv/setup.sh first.
# Thin front-end over `python3 -m pytest_katamaran.node_vm start b --foreground`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$here}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m pytest_katamaran.node_vm start b --foreground "$@"
