"""Watch the source VM's tap queues, so the switchover waits until they are empty.

Why: once QEMU pauses the VM, virtio-net stops reading its tap.  Frames the kernel had
already queued on the tap (the tun ring) would then die with the source QEMU: the tunnel
only catches what arrives *after* the switch.  katamaran therefore switches traffic into
the tunnel first, waits here until the still-running VM has read everything queued on its
taps, and only then pauses it.

How: QEMU's pid comes from the QMP socket (SO_PEERCRED); its tap fds are the
`/dev/net/tun` entries of `/proc/<pid>/fd` (fdinfo names the interface); `pidfd_getfd(2)`
gives katamaran a duplicate of each, on which poll(POLLIN) says whether a frame is still
queued.  Nothing is ever read from them.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from dataclasses import dataclass, field
from pathlib import Path

SYS_PIDFD_GETFD = 438  # x86_64, arm64 and the other generic-syscall architectures
TUN_DEVICE = "/dev/net/tun"


class TapQueueUnavailable(Exception):
    """The tap fds cannot be watched (no permission, old kernel, QEMU gone)."""


def tap_fds(pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """QEMU's open tun fds and the interface each one serves: {fd: ifname}."""
    fds: dict[int, str] = {}
    try:
        entries = list((proc / str(pid) / "fd").iterdir())
    except OSError as err:
        raise TapQueueUnavailable(f"cannot list /proc/{pid}/fd: {err.strerror or err}") from None
    for entry in entries:
        try:
            if os.readlink(entry) != TUN_DEVICE:
                continue
            info = (proc / str(pid) / "fdinfo" / entry.name).read_text()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == "iff" and value.strip():
                fds[int(entry.name)] = value.strip()
    return fds


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if dup < 0:
        err = ctypes.get_errno()
        raise TapQueueUnavailable(f"pidfd_getfd: {os.strerror(err)}")
    return int(dup)


@dataclass
class TapQueues:
    """Duplicates of a QEMU's tap fds, polled (never read) to see queued frames."""

    pid: int
    fds: dict[int, str] = field(default_factory=dict)  # our duplicate fd -> ifname

    @classmethod
    def of(cls, pid: int) -> TapQueues:
        found = tap_fds(pid)
        queues = cls(pid)
        if not found:
            return queues
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as err:
            raise TapQueueUnavailable(f"pidfd_open({pid}): {err.strerror or err}") from None
        try:
            for fd, ifname in found.items():
                queues.fds[_pidfd_getfd(pidfd, fd)] = ifname
        except TapQueueUnavailable:
            queues.close()
            raise
        finally:
            os.close(pidfd)
        return queues

    @property
    def names(self) -> list[str]:
        return sorted(set(self.fds.values()))

    def queued(self) -> list[str]:
        """Interfaces that still hold at least one frame for the VM."""
        if not self.fds:
            return []
        poller = select.poll()
        for fd in self.fds:
            poller.register(fd, select.POLLIN)
        return sorted({self.fds[fd] for fd, ev in poller.poll(0) if ev & select.POLLIN})

    def wait_empty(self, timeout: float, settle: float = 0.02) -> list[str]:
        """Block until every queue is seen empty twice, `settle` s apart; [] on success,
        else the interfaces still holding frames when `timeout` ran out."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.queued()
            if not busy:
                time.sleep(settle)  # QEMU may be between two reads: look once more
                busy = self.queued()
                if not busy:
                    return []
            if time.monotonic() >= deadline:
                return busy
            time.sleep(0.005)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
