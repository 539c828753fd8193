"""cloud-init NoCloud seeds for the lab nodes (ISO 9660 labelled ``cidata``).

Why one module: the guide's Ubuntu nodes are configured by cloud-init from this seed, and
the offline Debian nodes apply the same seed with ``guest/node-cloudinit``, so both kinds
get the user ``ubuntu`` (passwordless sudo, the lab key, password ``ubuntu``) and their
hostname from one place. user-data is ``#cloud-config`` followed by JSON: valid YAML for
cloud-init, and parseable on the offline node without PyYAML. The ISO is written with
pycdlib (pure Python), or ``cloud-localds``/``genisoimage`` when pycdlib is missing.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SEED_LABEL = "cidata"
DEFAULT_USER = "ubuntu"
DEFAULT_PASSWORD = "ubuntu"
NETWORK_TEMPLATE = Path(__file__).resolve().parents[2] / "testenv" / "network-config.yaml"
PRIVATE_IP_PLACEHOLDER = "@PRIVATE_IP@"
MAC_PLACEHOLDERS = {"nat": "@NAT_MAC@", "private": "@PRIVATE_MAC@"}
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Kata's static release (QEMU, kernel, guest image, shim) as the guide's nodes install it.
KATA_VERSION = "3.2.0"
KATA_URL = (
    "https://github.com/kata-containers/kata-containers/releases/download/"
    f"{KATA_VERSION}/kata-static-{KATA_VERSION}-amd64.tar.xz"
)
READY_MARKER = "KATAMARAN-NODE-READY"
_KATA_CFG = "/etc/kata-containers/configuration.toml"

# Kata Containers + containerd on an Ubuntu node (ignored by the offline node: no internet).
# Appended to `containerd config default` (which already says version = 2).
_CONTAINERD_KATA = """\
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
"""
_RUNCMD: list[str] = [
    "modprobe sch_plug ipip tun veth act_mirred sch_ingress cls_u32 cls_matchall",
    "sysctl -w net.ipv4.ip_forward=1",
    f"curl -fsSL --retry 3 -o /tmp/kata-static.tar.xz {KATA_URL}",
    "tar -xJf /tmp/kata-static.tar.xz -C /",
    "ln -sf /opt/kata/bin/containerd-shim-kata-v2 /usr/local/bin/containerd-shim-kata-v2",
    "ln -sf /opt/kata/bin/kata-runtime /usr/local/bin/kata-runtime",
    "mkdir -p /etc/kata-containers",
    f"cp /opt/kata/share/defaults/kata-containers/configuration-qemu.toml {_KATA_CFG}",
    # a second QMP monitor for katamaran (the shim owns the primary one); Kata only
    # creates it with enable_debug = true
    f"sed -i '/^\\[hypervisor\\.qemu\\]/,/^\\[/{{s/^enable_debug = false/enable_debug = true/;"
    f's/^extra_monitor_socket = ""/extra_monitor_socket = "qmp"/}}\' {_KATA_CFG}',
    f"grep -q '^extra_monitor_socket = \"qmp\"' {_KATA_CFG}"
    f" || sed -i '/^\\[hypervisor\\.qemu\\]/a extra_monitor_socket = \"qmp\"' {_KATA_CFG}",
    "mkdir -p /etc/containerd",
    "containerd config default > /etc/containerd/config.toml",
    "cat /etc/containerd/kata-runtime.toml >> /etc/containerd/config.toml",
    "systemctl restart containerd",
    f"echo {READY_MARKER} > /dev/ttyS0",
]


def user_data(
    hostname: str,
    authorized_keys: list[str],
    *,
    user: str = DEFAULT_USER,
    password: str = DEFAULT_PASSWORD,
) -> dict[str, Any]:
    """The guide's cloud-config: the lab user, then packages and Kata Containers."""
    return {
        "hostname": hostname,
        "preserve_hostname": False,
        "users": [
            {
                "name": user,
                "groups": ["sudo"],
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": False,
                "ssh_authorized_keys": [k.strip() for k in authorized_keys],
            }
        ],
        "chpasswd": {
            "expire": False,
            "users": [{"name": user, "password": password, "type": "text"}],
        },
        "ssh_pwauth": True,
        "package_update": True,
        "packages": [
            "containerd",
            "curl",
            "iproute2",
            "iputils-ping",
            "jq",
            "python3-pip",
            "qemu-utils",
            "xz-utils",
        ],
        "write_files": [
            {
                "path": "/etc/modules-load.d/katamaran.conf",
                "content": "sch_plug\nipip\ntun\nveth\nact_mirred\n",
            },
            {
                "path": "/etc/sysctl.d/90-katamaran.conf",
                "content": "net.ipv4.ip_forward = 1\n",
            },
            {"path": "/etc/containerd/kata-runtime.toml", "content": _CONTAINERD_KATA},
        ],
        "runcmd": list(_RUNCMD),
    }


def render_user_data(data: dict[str, Any]) -> str:
    """``#cloud-config`` + JSON (a YAML subset cloud-init reads as is)."""
    return "#cloud-config\n" + json.dumps(data, indent=2) + "\n"


def render_meta_data(instance_id: str, hostname: str) -> str:
    """NoCloud meta-data; a new instance-id makes cloud-init run again on a reused disk."""
    return f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"


def render_network_config(
    private_ip: str, nic_macs: dict[str, str], template: Path = NETWORK_TEMPLATE
) -> str:
    """testenv/network-config.yaml with the node's private address (ADDR/LEN) and its NICs'
    MACs (``{"nat": ..., "private": ...}``) filled in: NICs are matched by MAC, not name."""
    if "/" not in private_ip:
        raise ValueError(f"private_ip must be ADDR/LEN, got {private_ip!r}")
    if set(nic_macs) != set(MAC_PLACEHOLDERS) or not all(
        _MAC.match(mac) for mac in nic_macs.values()
    ):
        raise ValueError(f"nic_macs must map nat and private to lower-case MACs, got {nic_macs}")
    try:
        text = template.read_text()
    except OSError as e:
        raise FileNotFoundError(f"network-config template {template} not readable: {e}") from e
    for placeholder in (PRIVATE_IP_PLACEHOLDER, *MAC_PLACEHOLDERS.values()):
        if placeholder not in text:
            raise ValueError(f"{template} has no {placeholder} placeholder")
    text = text.replace(PRIVATE_IP_PLACEHOLDER, private_ip)
    for nic, placeholder in MAC_PLACEHOLDERS.items():
        text = text.replace(placeholder, nic_macs[nic])
    return text


def write_iso(out: Path, files: dict[str, str], label: str = SEED_LABEL) -> Path:
    """An ISO 9660 + Rock Ridge + Joliet image holding ``files`` (name -> text)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        import pycdlib
    except ImportError:
        _write_iso_tool(tmp, files, label)
    else:
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
        for name, text in files.items():
            data = text.encode()
            iso9660 = "/" + name.upper().replace("-", "_").replace(".", "_")[:30] + ".;1"
            iso.add_fp(io.BytesIO(data), len(data), iso9660, rr_name=name, joliet_path="/" + name)
        iso.write(str(tmp))
        iso.close()
    tmp.replace(out)
    return out


def _write_iso_tool(out: Path, files: dict[str, str], label: str) -> None:
    """Fallback without pycdlib: genisoimage (cloud-image-utils' cloud-localds uses it)."""
    tool = shutil.which("genisoimage") or shutil.which("mkisofs") or shutil.which("xorrisofs")
    if tool is None:
        raise RuntimeError(
            "cannot write the cloud-init seed: pip install pycdlib (or apt-get install genisoimage)"
        )
    with tempfile.TemporaryDirectory(prefix="katamaran-seed-") as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        argv = [tool, "-quiet", "-output", str(out), "-volid", label, "-joliet", "-rock"]
        subprocess.run([*argv, *files], cwd=tmp, check=True, capture_output=True)


def write_seed(
    out: Path,
    *,
    hostname: str,
    authorized_keys: list[str],
    private_ip: str,
    nic_macs: dict[str, str],
    instance_id: str | None = None,
) -> Path:
    """The node's NoCloud seed ISO: user-data, meta-data and network-config."""
    files = {
        "user-data": render_user_data(user_data(hostname, authorized_keys)),
        "meta-data": render_meta_data(instance_id or f"katamaran-{hostname}", hostname),
        "network-config": render_network_config(private_ip, nic_macs),
    }
    return write_iso(out, files)
