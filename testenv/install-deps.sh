#!/usr/bin/env bash
# Install everything katamaran and its test harness need on Debian/Ubuntu (run as root).
# Thin on purpose: apt packages, then the project itself with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils      # the VMs (TCG works everywhere; KVM when usable)
  busybox-static cpio kmod lz4    # the test guest's initramfs, kernel modules, fast boot
  gcc libc6-dev                   # the guest's static disk writer
  iproute2 iputils-ping procps    # namespaces, the zero-drop ping
  openssh-client openssh-server   # SSH into the lab nodes (sshd runs only inside nodes)
  sudo e2fsprogs util-linux       # what the node VMs run from the host root
  python3-pip python3-venv
)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: apt-get install ${APT_PACKAGES[*]}" >&2
# Keep package scripts from starting services (sshd) on this machine.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
echo "install-deps: pip install -e '.[test]'" >&2
python3 -m pip install -q -e '.[test]' 2>&1 | grep -v -e "^WARNING: Running pip as" -e "^WARNING: Location" || true
python3 -c "import katamaran, pytest_katamaran.plugin" # fail here, not in the tests
