#!/usr/bin/env bash
# Install everything, then run one real live migration on this machine (see README).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
bash testenv/install-deps.sh
katamaran_python
exec "$KATAMARAN_PY" -m pytest_katamaran.demo "$@"
