#!/usr/bin/env bash
# Minikube smoke test (TESTING.md "Minikube Smoke Test"): katamaran against a live Kata
# VM's QMP socket in a one-node minikube (kvm2, containerd, kata-deploy).
#   ./testenv/minikube-test.sh          # deletes the cluster afterwards
#   ./testenv/minikube-test.sh --keep   # keeps it for debugging (KATAMARAN_KEEP_CLUSTER=1)
# Thin front-end over `python -m pytest tests/e2e/test_minikube.py -v`; it skips with the
# exact missing prerequisite (nested KVM, minikube, kubectl, KATAMARAN_INTERNET=1).
set -euo pipefail

usage() {
    echo "Usage: ./testenv/minikube-test.sh [--keep]" >&2
}

keep=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "minikube-test.sh: unknown argument: $arg" >&2
            usage
            exit 2
            ;;
    esac
done

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"
export PYTHONPATH="$KATAMARAN_REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ $keep -eq 1 ]]; then
    export KATAMARAN_KEEP_CLUSTER=1
fi
katamaran_python
exec "$KATAMARAN_PY" -m pytest tests/e2e/test_minikube.py -v -rs
