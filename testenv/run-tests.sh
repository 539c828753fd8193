#!/usr/bin/env bash
# The project's whole test run: smoke + plugin + integration (real QEMU on this machine),
# then the two-node e2e suite (real QEMU node VMs). Extra args go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -n 2 -p no:cacheprovider -rs "$@"
python3 -m pytest tests/e2e --nodes=qemu -p no:cacheprovider -rs --timeout 1200 "$@"
