"""Run configuration and the defaults the guide's troubleshooting table refers to."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QMP = Path("/run/vc/vm/qmp.sock")
DEFAULT_DRIVE_ID = "drive-virtio-disk0"
NBD_PORT = 10809  # -nbd-port (the guide's port)
MIGRATION_PORT = 4444  # -migration-port (the guide's port)
TLS_DIR = Path("/etc/pki/qemu")  # -tls-dir: libvirt's default directory for QEMU's x509 files

# The guide names these "constants"; here they are flags with these defaults.
MIGRATION_TIMEOUT = 600.0  # -migration-timeout: RAM pre-copy must converge within this
STORAGE_SYNC_TIMEOUT = 600.0  # -storage-sync-timeout: drive-mirror must reach READY
QMP_TIMEOUT = 30.0  # -qmp-timeout: one QMP command must be answered within this
TUNNEL_HOLD = 5.0  # -tunnel-hold: keep the tunnel this long for CNI convergence
SWITCHOVER_TIMEOUT = 5.0  # -switchover-timeout: the paused mirror drain must end within this
TAP_DRAIN_TIMEOUT = 2.0  # -tap-drain-timeout: the tap queue is taken off within this
DEST_TIMEOUT = 1800.0  # -dest-timeout: how long the destination waits for the VM to resume
DOWNTIME_LIMIT_MS = 50
PLUG_LIMIT = 1 << 20  # bytes held by sch_plug while the VM is paused (~10k pings)
# -stream-buffer: the RAM migration stream's socket buffer (source SO_SNDBUF, destination
# SO_RCVBUF).  None ("auto", the default): each end sizes it from its connection's RTT
# (see streambuf); 0 leaves both to the kernel's autotuning; else bytes, as given.
STREAM_BUFFER: int | None = None
MAX_STREAM_BUFFER = 1 << 30  # the kernel caps it far lower (net.core.*mem_max)
# -copy-mode.  "auto": background (libvirt's default) until the mirror is READY, then
# write-blocking where QEMU can switch a running job (block-job-change, QEMU 8.2+), so
# nothing is left to drain while the VM is paused; QEMU < 8.2 stays background.  A
# mirror started write-blocking converges under any write rate, but QEMU 7.2 corrupts
# its heap when such a mirror is cancelled early (seen here: 4 crashes in 5).
COPY_MODE = "auto"
COPY_MODES = ("auto", "background", "write-blocking")
# -early-ram: `migrate` starts while the disk is still mirrored, QEMU held at the
# switchover gate after its first RAM pass until the mirror is READY (see Source).  Off by
# default, as libvirt and KubeVirt order it (disk first, then RAM): the two copies compete
# for the same CPUs and link, and RAM dirtied meanwhile is sent again.  Measured
# 2026-12-03 (2-core Xeon, TCG, 5 rounds per point, one run per arm, each against its own
# bare rounds), katamaran's migration over bare's with it / without: disk 512 MiB + RAM
# 512 MiB 1.22-1.26x / 0.98x (the mirror took 1.09 s instead of 0.58), RAM 128 MiB
# 1.10-1.33x / 1.06x, the RAM-dirtying guest 1.10-1.24x / 1.05x; it paid only where one
# copy dwarfs the other: disk 2 GiB 0.95-0.99x / 1.03x, RAM 2 GiB 0.80-1.00x / 1.01x
# (on 2026-12-02's AMD machine 0.87-0.97x / 1.05-1.13x at those large points).
EARLY_RAM = False

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Config:
    """Everything one run needs, validated by the CLI before anything is touched."""

    mode: str
    qmp: Path = DEFAULT_QMP
    tap: str = ""
    dest_ip: IPAddress | None = None
    vm_ip: IPAddress | None = None
    drive_id: str = DEFAULT_DRIVE_ID
    shared_storage: bool = False
    copy_mode: str = COPY_MODE
    early_ram: bool = EARLY_RAM  # source: RAM copied while the mirror copies (see Source)
    migration_timeout: float = MIGRATION_TIMEOUT
    storage_sync_timeout: float = STORAGE_SYNC_TIMEOUT
    qmp_timeout: float = QMP_TIMEOUT
    tunnel_hold: float = TUNNEL_HOLD
    dest_timeout: float = DEST_TIMEOUT
    tap_drain_timeout: float = TAP_DRAIN_TIMEOUT
    switchover_timeout: float = SWITCHOVER_TIMEOUT
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS
    plug_limit: int = PLUG_LIMIT
    stream_buffer: int | None = STREAM_BUFFER  # bytes; 0: the kernel's; None: auto
    nbd_port: int = NBD_PORT
    migration_port: int = MIGRATION_PORT
    source_ip: IPAddress | None = None  # dest: the only peer allowed on NBD/migration/tunnel
    listen_ip: IPAddress | None = None  # dest: bind the listeners to this address only
    tls: bool = False  # both streams over TLS (x509 files from tls_dir); required when set
    tls_dir: Path = TLS_DIR


def host_port(ip: IPAddress | str, port: int) -> str:
    """`host:port` with IPv6 hosts bracketed, as QEMU URIs and users expect."""
    host = str(ip)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
