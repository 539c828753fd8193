#!/usr/bin/env bash
# k3s end-to-end lab on the running guide nodes (TESTING.md "k3s End-to-End Migration Test"):
#   ./testenv/k3s-e2e.sh setup      # k3s server on Node A, agent on Node B, kata RuntimeClass,
#                                   # nginx:alpine Kata pod on Node A; prints the next steps
#   ./testenv/k3s-e2e.sh status     # cluster, pods, QEMU processes
#   ./testenv/k3s-e2e.sh teardown   # uninstall k3s (the VMs stay running)
# Needs ./testenv/start-node-a.sh and start-node-b.sh running. Thin front-end over
# `python -m pytest_katamaran.kube.k3s setup|status|teardown`.
set -euo pipefail

usage() {
    echo "Usage: ./testenv/k3s-e2e.sh setup|status|teardown" >&2
}

if [[ $# -ne 1 ]]; then
    usage
    exit 2
fi
case "$1" in
    setup | status | teardown) ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "k3s-e2e.sh: unknown command: $1" >&2
        usage
        exit 2
        ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# The key (kata_test_rsa) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$KATAMARAN_REPO/testenv}"
export PYTHONPATH="$KATAMARAN_REPO${PYTHONPATH:+:$PYTHONPATH}"
katamaran_python
exec "$KATAMARAN_PY" -m pytest_katamaran.kube.k3s "$1"
