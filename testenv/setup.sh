#!/usr/bin/env bash
# Provision the two-node lab (the guide's section 1): check host packages and that
# katamaran is installed (./testenv/install-deps.sh), then build/cache the node image, COW
# overlays, SSH keypair (testenv/kata_test_rsa) and cloud-init seeds. Thin front-end over
# `python -m pytest_katamaran.qemu.node setup` (options: --image debian|ubuntu, --accel ...).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# State (key, overlays, seeds) lives next to this script unless the caller points elsewhere.
export KATAMARAN_TESTENV_DIR="${KATAMARAN_TESTENV_DIR:-$KATAMARAN_REPO/testenv}"
export PYTHONPATH="$KATAMARAN_REPO${PYTHONPATH:+:$PYTHONPATH}"

echo "==> Checking host dependencies"
katamaran_python
image=debian
for arg in "$@"; do
    case "$arg" in --image=*) image="${arg#--image=}" ;; ubuntu | debian) image="$arg" ;; esac
done
"$KATAMARAN_PY" -m pytest_katamaran.qemu.node check-deps --image "$image"
if ! "$KATAMARAN_PY" -c 'import katamaran, paramiko, pycdlib' >/dev/null 2>&1; then
    echo "katamaran or its test extra is missing from $KATAMARAN_PY." \
        "Run ./testenv/install-deps.sh (as root) first." >&2
    exit 1
fi

exec "$KATAMARAN_PY" -m pytest_katamaran.qemu.node setup "$@"
