#!/usr/bin/env bash
# Provision the two-node lab (the guide's section 1): check host packages, make sure
# katamaran is installed, then build/cache the node image, COW overlays, SSH keypair
# (testenv/kata_test_rsa) and cloud-init seeds. Thin front-end over
# `python3 -m pytest_katamaran.node_vm setup` (options: --image debian|ubuntu, --accel ...).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$here}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

echo "==> Checking host dependencies"
if ! command -v python3 >/dev/null 2>&1; then
    echo "Missing host packages: python3 (apt-get install -y python3 python3-pip)" >&2
    exit 1
fi
image=debian
for arg in "$@"; do
    case "$arg" in --image=*) image="${arg#--image=}" ;; ubuntu | debian) image="$arg" ;; esac
done
python3 -m pytest_katamaran.node_vm check-deps --image "$image"

if ! python3 -c 'import katamaran, paramiko, pycdlib' >/dev/null 2>&1; then
    echo "==> Installing katamaran (pip install -e .[test])"
    python3 -m pip install -e "$repo[test]"
fi

exec python3 -m pytest_katamaran.node_vm setup "$@"
