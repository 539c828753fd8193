#!/usr/bin/env bash
# Install everything katamaran and its test harness need on Debian/Ubuntu (run as root).
# Thin on purpose: apt packages, then the project with its test extra in a virtual
# environment (.venv in the checkout, made by the distribution's python3 -m venv: stock
# Debian 12 / Ubuntu 24.04 refuse pip installs into the system Python, PEP 668), then
# /usr/local/bin/katamaran pointing into it for the guide's commands. Rerunning is cheap.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$KATAMARAN_REPO"

APT_PACKAGES=(
  qemu-system-x86 qemu-utils      # the VMs (TCG works everywhere; KVM when usable)
  busybox-static cpio kmod lz4    # the test guest's initramfs, kernel modules, fast boot
  gcc libc6-dev                   # the guest's static disk writer
  iproute2 iputils-ping procps    # namespaces, the zero-drop ping
  openssh-client openssh-server   # SSH into the lab nodes (sshd runs only inside nodes)
  sudo e2fsprogs util-linux       # what the node VMs run from the host root
  openssl                         # the TLS tests make their own x509 certificates
  python3 python3-venv            # the project's .venv (pip comes with it)
)
LINK=/usr/local/bin/katamaran

say() { echo "install-deps: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
say "apt-get install ${APT_PACKAGES[*]}"
# Keep package scripts from starting services (sshd) on this machine.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null

# The venv must run and be built on $KATAMARAN_BASE_PYTHON; anything else (a broken
# venv, one made by pyenv's python, one whose interpreter was removed) is rebuilt.
venv_py="$KATAMARAN_VENV/bin/python"
where='import sys; print(sys.base_prefix, "%d.%d" % sys.version_info[:2])'
want="$("$KATAMARAN_BASE_PYTHON" -c "$where")"
if [ -e "$KATAMARAN_VENV" ]; then
  have="$("$venv_py" -c "$where" 2>/dev/null || echo broken)"
  if [ "$have" != "$want" ]; then
    say "$KATAMARAN_VENV is built on '$have', not $KATAMARAN_BASE_PYTHON ('$want'): recreating it"
    rm -rf "$KATAMARAN_VENV"
  fi
fi
if [ ! -e "$KATAMARAN_VENV" ]; then
  say "$KATAMARAN_BASE_PYTHON -m venv $KATAMARAN_VENV"
  "$KATAMARAN_BASE_PYTHON" -m venv "$KATAMARAN_VENV"
fi
say "$venv_py -m pip install -e '.[test]'"
# (pip's status survives the filter: pipefail; the filter drops noise from find-links setups)
PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
  "$venv_py" -m pip install -q -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" >&2 || true; }
"$venv_py" -c "import katamaran, pytest_katamaran.plugin" # fail here, not in the tests

# `katamaran` on PATH for the guide's commands (sudo's secure_path has /usr/local/bin too).
target="$KATAMARAN_VENV/bin/katamaran"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
  old="$(readlink "$LINK" || true)"
  ln -sfn "$target" "$LINK"
  if [ -n "$old" ] && [ "$old" != "$target" ]; then
    say "$LINK -> $target (was -> $old)"
  else
    say "$LINK -> $target"
  fi
else
  say "$LINK exists and is not a symlink: left alone; run $target instead"
fi
say "done: scripts under testenv/ use $venv_py (no activation needed)"
