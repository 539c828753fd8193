"""The nested guests of a command run inside a lab node (lab.node.run_in_node).

Why one module: the ping-rate benchmark and the tunnel-hold faults both boot a Kata-shaped
pod inside a Debian-kernel node.  The host passes the cached test guest and the backports
QEMU (the node sees this host's root) as flags; inside, the command loads the taps'
module, chooses the pod's accelerator with the same real boot as the e2e's nodes
(qemu.accel.pod_accel) and builds each pod's lab.local.Rig the same way.  One copy of
the flags and of the Rig's settings keeps the two from drifting apart.
"""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_katamaran.images.guest import GuestImage
    from pytest_katamaran.lab.local import Rig
    from pytest_katamaran.qemu.accel import Accel
    from pytest_katamaran.qemu.binary import WorkloadQemu

FLAGS = ("--kernel", "--initrd", "--qemu", "--qemu-datadir")
# A nested boot on a loaded TCG node took up to 20 min under nested TCG (2026-12-02).
BOOT_TIMEOUT = 1800.0
READY_TIMEOUT = 600.0


def host_flags(guest: GuestImage, qemu: WorkloadQemu) -> list[str]:
    """What the host passes the inner command: the test guest and the pods' QEMU."""
    return [
        "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
        "--qemu", qemu.binary, "--qemu-datadir", qemu.datadir,
    ]  # fmt: skip


def add_flags(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """The inner command's side of :func:`host_flags`."""
    for name in FLAGS:
        parser.add_argument(name, default="", help=argparse.SUPPRESS if hidden else None)


@dataclass(frozen=True)
class NestedGuests:
    """The pods' guest, QEMU and accelerator inside the node; :meth:`rig` builds one pod."""

    guest: GuestImage
    qemu: WorkloadQemu
    accel: Accel

    @classmethod
    def from_args(cls, args: argparse.Namespace, accel: str) -> NestedGuests:
        """Load the taps' module and choose the accelerator (a real boot for auto/kvm)."""
        from pytest_katamaran.images.guest import GuestImage
        from pytest_katamaran.qemu.accel import pod_accel
        from pytest_katamaran.qemu.binary import WorkloadQemu

        subprocess.run(["modprobe", "tun"], check=False)  # the taps' module, before use
        return cls(
            GuestImage(Path(args.kernel), Path(args.initrd), ""),
            WorkloadQemu(args.qemu, args.qemu_datadir, ""),
            pod_accel(accel),
        )

    @property
    def note(self) -> str:
        """One progress line: which accelerator the pods got and why."""
        return f"nested guests under {self.accel.name.upper()} ({self.accel.reason})"

    def rig(self, tmp: Path) -> Rig:
        """Two netns nodes and a Kata-shaped pod (Calico veth, tcfilter) on node a."""
        from pytest_katamaran.lab.local import Rig

        return Rig(
            self.guest,
            tmp,
            kata_pod=True,
            qemu=self.qemu,
            accel=self.accel.name,
            boot_timeout=BOOT_TIMEOUT,
            ready_timeout=READY_TIMEOUT,
        )
