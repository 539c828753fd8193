"""The one source of truth for the workload VM's QEMU command line.

Why one module: live migration only works when source and destination QEMU expose
the same machine, devices, ids and MACs.  Every part of the harness (and the tool's
destination replay) builds argv through `sandbox_argv`, so the two sides cannot drift.
The layout mirrors what Kata Containers' QEMU hypervisor driver produces
(`-name sandbox-<id>`, `-pidfile /run/vc/vm/<id>/pid`, `/dev/shm`-backed RAM,
`drive-virtio-disk0`, `network-0` on `tap0_kata`), minus the fd-passed sockets and
vhost/vsock/virtiofs devices a bare test guest does not need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_RUN_DIR = Path("/run/vc/vm")
DEFAULT_DRIVE_ID = "drive-virtio-disk0"
DEFAULT_NETDEV_ID = "network-0"
DEFAULT_TAP = "tap0_kata"
DEFAULT_MAC = "02:4b:4d:52:00:01"  # locally administered, "KMR"
QMP_SOCKET = "qmp.sock"
EXTRA_MONITOR_SOCKET = "extra-monitor.sock"
PIDFILE = "pid"
CONSOLE_LOG = "console.log"
# A pod's vCPUs, as Kata's default_vcpus; the in-node KVM probe boots this many (qemu.accel).
POD_SMP = 1

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107


@dataclass
class SandboxSpec:
    """Everything that shapes one workload VM; source and destination share one spec.

    Why a dataclass: the destination is `dataclasses.replace(src, disk=..., incoming=...)`
    (see `for_destination`), which makes "identical apart from -incoming and the disk"
    true by construction.
    """

    sandbox_id: str
    kernel: Path
    initrd: Path
    append: str = ""
    run_dir: Path = DEFAULT_RUN_DIR
    disk: Path | None = None
    disk_format: str = "qcow2"
    drive_id: str = DEFAULT_DRIVE_ID
    # The drive's write-error policy (QEMU's werror: None keeps its default, enospc).
    werror: str | None = None
    # A blkdebug rules file put between the drive's format and its file, so a test can
    # make QEMU see an I/O error (the source only: for_destination drops it).
    blkdebug: Path | None = None
    memory_mib: int = 128
    smp: int = POD_SMP
    machine: str = "pc"
    accel: str = "tcg"
    # TCG threading: "single" measured no slower than MTTCG for a 1-vCPU guest
    # (see report / test_sandbox boot figures); None leaves QEMU's default.
    tcg_thread: str | None = "single"
    cpu: str | None = None  # None: QEMU default under TCG, "host" under KVM
    tap: str | None = DEFAULT_TAP
    mac: str = DEFAULT_MAC
    incoming: str | None = None  # None | "defer" | "tcp:[::]:4444"
    extra_monitor: bool = False
    qemu_binary: str = "qemu-system-x86_64"
    extra_args: list[str] = field(default_factory=list)

    @property
    def sandbox_dir(self) -> Path:
        """Kata's per-sandbox runtime directory, `<run_dir>/<id>`."""
        return Path(self.run_dir) / self.sandbox_id

    @property
    def qmp_path(self) -> Path:
        """Primary QMP socket (with real Kata this one is held by the shim)."""
        return self.sandbox_dir / QMP_SOCKET

    @property
    def extra_monitor_path(self) -> Path:
        """Kata's optional second QMP monitor (`extra_monitor_socket = "qmp"`)."""
        return self.sandbox_dir / EXTRA_MONITOR_SOCKET

    @property
    def monitor_path(self) -> Path:
        """The socket a tool should use: the extra monitor when configured."""
        return self.extra_monitor_path if self.extra_monitor else self.qmp_path

    @property
    def pidfile(self) -> Path:
        """Where QEMU writes its PID, as Kata's `-pidfile`."""
        return self.sandbox_dir / PIDFILE

    @property
    def console_log(self) -> Path:
        """Serial console (ttyS0) captured to a file for READY detection and post-mortems."""
        return self.sandbox_dir / CONSOLE_LOG

    def for_destination(
        self,
        *,
        disk: Path | None = None,
        incoming: str = "defer",
        run_dir: Path | None = None,
    ) -> SandboxSpec:
        """The matching destination spec: only -incoming, the disk and host paths change.

        `run_dir` only moves host-side files (sockets, pidfile, console); it exists
        because the single-host lab cannot put both sides under the same directory.
        """
        return dataclasses.replace(
            self,
            disk=self.disk if disk is None else disk,
            blkdebug=None,
            incoming=incoming,
            run_dir=self.run_dir if run_dir is None else run_dir,
            extra_args=list(self.extra_args),
        )


def _opt(value: str | Path) -> str:
    """Escape a value for QEMU's comma-separated option syntax (',' doubles)."""
    return str(value).replace(",", ",,")


def _check_socket_path(path: Path) -> None:
    """Fail early: QEMU's own error for an over-long unix socket path is obscure."""
    if len(str(path).encode()) > _UNIX_PATH_MAX:
        raise ValueError(
            f"unix socket path too long ({len(str(path))} > {_UNIX_PATH_MAX} bytes): {path}"
        )


def sandbox_argv(spec: SandboxSpec) -> list[str]:
    """Lay out the QEMU argv for `spec` the way Kata does.

    Pure function: no filesystem access beyond string checks, so it is unit tested and
    the destination's argv can be compared token by token with the source's.
    """
    if spec.accel not in ("tcg", "kvm"):
        raise ValueError(f"accel must be 'tcg' or 'kvm', not {spec.accel!r}")
    if spec.memory_mib <= 0 or spec.smp <= 0:
        raise ValueError("memory_mib and smp must be positive")
    _check_socket_path(spec.qmp_path)
    if spec.extra_monitor:
        _check_socket_path(spec.extra_monitor_path)

    mem = f"{spec.memory_mib}M"
    argv: list[str] = [
        spec.qemu_binary,
        "-name",
        f"sandbox-{spec.sandbox_id}",
        "-machine",
        spec.machine,
    ]
    if spec.accel == "tcg":
        accel = "tcg" + (f",thread={spec.tcg_thread}" if spec.tcg_thread else "")
    else:
        accel = "kvm"
    argv += ["-accel", accel]
    cpu = spec.cpu or ("host" if spec.accel == "kvm" else None)
    if cpu:
        argv += ["-cpu", cpu]
    argv += [
        "-qmp",
        f"unix:{_opt(spec.qmp_path)},server=on,wait=off",
    ]
    if spec.extra_monitor:
        argv += ["-qmp", f"unix:{_opt(spec.extra_monitor_path)},server=on,wait=off"]
    argv += [
        "-m",
        mem,
        "-smp",
        str(spec.smp),
        "-display",
        "none",
        "-vga",
        "none",
        "-no-user-config",
        "-nodefaults",
        "-no-reboot",
        "-rtc",
        "base=utc,driftfix=slew,clock=host",
        "-object",
        f"memory-backend-file,id=dimm1,size={mem},mem-path=/dev/shm,share=on",
        "-numa",
        "node,memdev=dimm1",
    ]
    if spec.disk is not None:
        file = _opt(spec.disk)
        if spec.blkdebug is not None:
            file = f"blkdebug:{_opt(spec.blkdebug)}:{file}"
        werror = f",werror={spec.werror}" if spec.werror else ""
        argv += [
            "-drive",
            f"id={spec.drive_id},if=none,file={file},format={spec.disk_format},"
            f"aio=threads,cache=writeback{werror}",
            "-device",
            f"virtio-blk-pci,drive={spec.drive_id},id=virtio-disk0,config-wce=off,share-rw=on",
        ]
    if spec.tap is not None:
        argv += [
            "-netdev",
            f"tap,id={DEFAULT_NETDEV_ID},ifname={spec.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev={DEFAULT_NETDEV_ID},id=net0,mac={spec.mac},romfile=",
        ]
    argv += [
        "-serial",
        f"file:{spec.console_log}",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        spec.append,
        "-pidfile",
        str(spec.pidfile),
    ]
    argv += list(spec.extra_args)
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    return argv
