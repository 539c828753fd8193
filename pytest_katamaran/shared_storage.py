"""Shared storage for the lab: one qcow2 on this host, exported over NBD to both nodes.

Why this shape: the node VMs see the host root read-only, and QEMU in the source's pod
netns cannot open network connections of its own (Kata's tcfilter redirects all ingress
into the VM).  So each node maps the export as a kernel block device (`/dev/nbd0`, like
krbd/iSCSI for a real Kata node) and QEMU opens that device.  The export listens on
127.0.0.1 only; the nodes reach it through user-mode NAT's host alias.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from pytest_katamaran.checks.ping import LocalProcess
from pytest_katamaran.errors import HarnessError
from pytest_katamaran.net.listening import is_listening
from pytest_katamaran.qemu.node import free_port

# Inside a node, the host's loopback is reachable at user-mode NAT's host alias.
HOST_FROM_NODE = "10.0.2.2"
EXPORT_NAME = "shared"
DISK_SIZE = "64M"
NODE_DEVICE = "/dev/nbd0"


class NbdExport:
    """``qemu-nbd`` serving a fresh qcow2 (with 8 MiB the guest did not write) on loopback.

    ``start()`` returns once it listens; ``stop()`` is idempotent and kills it by PID.
    """

    def __init__(self, directory: Path, size: str = DISK_SIZE) -> None:
        self.path = directory / "shared.qcow2"
        self.size = size
        self.host = HOST_FROM_NODE
        self.export = EXPORT_NAME
        self.port = 0
        self.device = NODE_DEVICE
        self.proc: LocalProcess | None = None

    @staticmethod
    def missing() -> str | None:
        """The missing prerequisite, or None (a fixture skips with it)."""
        if shutil.which("qemu-nbd") is None:
            return "qemu-nbd not installed (apt-get install qemu-utils)"
        return None

    def start(self, timeout: float = 30.0) -> NbdExport:
        # preallocation=metadata: the export is the file's bytes and a block device cannot
        # grow, so the qcow2 must span its full size up front (sparse here).  Without it the
        # export is ~9 MB and the guest's first write past it pauses the VM (io-error).
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
            + [str(self.path), self.size],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40M 8M", str(self.path)],
            check=True,
            capture_output=True,
        )
        self.port = free_port()
        # -f raw: export the qcow2 file's bytes; each node's QEMU opens them as qcow2.
        self.proc = LocalProcess(
            ["qemu-nbd", "-t", "-e", "4", "-f", "raw", "-x", self.export]
            + ["-b", "127.0.0.1", "-p", str(self.port), str(self.path)]
        )
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if not self.proc.is_running() or time.monotonic() > deadline:
                why = self.proc.errors().strip() or "no output"
                self.stop()
                raise HarnessError(f"qemu-nbd did not listen on 127.0.0.1:{self.port}: {why}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.signal(signal.SIGTERM)
        if self.proc.wait(10) is None:
            self.proc.signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc.cleanup()
        self.proc = None

    def attach_args(self) -> list[str]:
        """The node agent's `nbd-attach` arguments for this export."""
        return ["--host", self.host, "--port", str(self.port), "--export", self.export]
