#!/usr/bin/env bash
# Install everything, then run one real live migration on this machine (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash testenv/install-deps.sh
exec python3 -m pytest_katamaran.demo "$@"
