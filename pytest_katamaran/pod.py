"""Kata pods on the lab nodes: the resource behind the ``kata_pod`` fixture.

Two kinds, chosen by ``--kata`` (ini ``katamaran_kata``):

* ``sandbox`` -- what the offline Debian nodes can run: the Kata-shaped sandbox the node
  agent (``nodeside workload-start``) builds: a pod netns with a Calico-style veth and
  Kata's tcfilter redirect, a tap named like Kata's, QEMU laid out as Kata lays it out
  (``qemu_cmd.SandboxSpec``) with its QMP socket under ``/run/vc/vm/<id>/``, and a guest
  that stamps its disk (``diskcheck``) all along.
* ``runtime`` -- a real Kata container through containerd.  Needs ``kata-runtime`` or
  ``containerd-shim-kata-v2`` on the node; without them the test is skipped naming them.
  ``auto`` (the default) picks ``runtime`` when the node has them, else ``sandbox``.

Why classes apart from the fixtures (pytest-django style): a test, a conftest or a script
can drive :class:`PodLab` directly; the fixtures only tie its lifetime to a test.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_katamaran.agent.client import NodeSide
from pytest_katamaran.checks.disk import DiskReport, verify_writes
from pytest_katamaran.errors import KataUnavailable, PodError, RuntimeNotImplemented
from pytest_katamaran.qemu.workload import DEFAULT_DRIVE_ID
from pytest_katamaran.shared_storage import NbdExport

KATA_BINARIES = ("kata-runtime", "containerd-shim-kata-v2")
DEFAULT_POD_IP = "10.244.1.5"
TAP = "tap0_kata"
DISK_DIR = "/var/lib/katamaran/e2e"
DISK_SIZE = "64M"
# Nested TCG (~17x slower than TCG): generous, but every wait is bounded.
BOOT_TIMEOUT = 900.0
POD_OPTIONS = (
    "ip",
    "memory",
    "disk_size",
    "writer",
    "writer_rate",
    "tcfilter",
    "boot_timeout",
    "accel",
)


@dataclass
class WriteCheck:
    """Outcome of :meth:`KataPod.verify_writes`: every acknowledged write on the disk."""

    ok: bool
    report: str
    acked: int
    acked_before_move: int | None = None
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join([*self.problems, self.report])


@dataclass
class KataPod:
    """A running Kata workload on one node.

    ``ip`` (the pod IP), ``node``, ``qmp_socket`` (on the node), ``tap``, ``drive_id``
    (the virtio-blk drive katamaran mirrors), ``disk`` (its path on the node),
    ``shared_storage``.  After ``migrate()``, the result's ``.pod`` is the pod on the new
    node and its ``previous`` the paused source it came from.
    """

    node: Any
    ip: str
    qmp_socket: str
    tap: str
    drive_id: str
    disk: str
    side: NodeSide = field(repr=False)
    role: str = "source"  # its record in the node agent's state on that node
    kind: str = "sandbox"
    export: NbdExport | None = field(default=None, repr=False)
    spec: dict[str, Any] = field(default_factory=dict, repr=False)
    argv: list[str] = field(default_factory=list, repr=False)
    boot_s: float | None = None
    previous: KataPod | None = field(default=None, repr=False)
    moved_to: KataPod | None = field(default=None, repr=False)
    last_ack: int | None = None  # set once stopped

    @property
    def shared_storage(self) -> bool:
        return self.export is not None

    @property
    def accel(self) -> str:
        """The accelerator its QEMU runs on (``kvm``/``tcg``, from the spec it started with)."""
        return str(self.spec.get("accel", "tcg"))

    @property
    def pod_cidr(self) -> str:
        """The node's pod range this IP came from (a /24, as Calico hands out blocks)."""
        return str(ipaddress.ip_network(f"{self.ip}/24", strict=False))

    def status(self) -> dict[str, Any]:
        """QMP status of this pod's VM as the node agent sees it (e.g. running)."""
        return dict(self.side.call("status", timeout=60).get(self.role) or {})

    def console(self, lines: int = 60) -> str:
        """The guest console's last lines (boot, the writer's ACKs, panics)."""
        return str(self.side.call("console", "--which", self.role, "--lines", str(lines))["tail"])

    def acked_writes(self) -> int:
        """Highest write the guest acknowledged so far (``ACK <n>`` on its console)."""
        if self.last_ack is not None:
            return self.last_ack
        return int(self.side.call("console", "--which", self.role, "--lines", "1")["last_ack"])

    def stop(self) -> int:
        """Stop the VM (by PID, on its node); returns its last acknowledged write."""
        if self.last_ack is None:
            self.last_ack = int(self.side.call("vm-stop", "--which", self.role)["last_ack"])
        return self.last_ack

    def verify_writes(self) -> WriteCheck:
        """Stop the pod (and the paused source it came from), then check its disk.

        Every write the guest acknowledged, before and after a move, must be on the
        disk it now runs on; after a move the guest must have acknowledged writes on
        both nodes (else the check proves nothing).
        """
        problems = []
        acked = self.stop()
        before = self.previous.stop() if self.previous is not None else None
        if before is not None:
            if before <= 0:
                problems.append("the guest never acknowledged a write before the move")
            if acked <= before:
                problems.append(f"the guest did not keep writing after the move ({acked})")
        elif acked <= 0:
            problems.append("the guest never acknowledged a write")
        if self.export is not None:
            for side in {id(p.side): p.side for p in (self, self.previous) if p}.values():
                side.call("nbd-detach")
            report: DiskReport = verify_writes(self.export.path, acked)
            ok, text = report.ok, str(report)
        else:
            out = self.side.call(
                "diskcheck", "--which", self.role, "--acked", str(acked), timeout=300
            )
            ok, text = bool(out["ok"]), str(out["report"])
        return WriteCheck(ok and not problems, text, acked, before, problems)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node.name,
            "ip": self.ip,
            "qmp_socket": self.qmp_socket,
            "tap": self.tap,
            "drive_id": self.drive_id,
            "disk": self.disk,
            "shared_storage": self.shared_storage,
            "kind": self.kind,
            "accel": self.accel,
            "boot_s": self.boot_s,
        }


def kata_binaries(node: Any) -> list[str]:
    """Which of :data:`KATA_BINARIES` the node has on PATH (asked over SSH)."""
    probe = "; ".join(f"command -v {shlex.quote(b)} || true" for b in KATA_BINARIES)
    res = node.ssh.run(probe, timeout=60, check=False)
    return [b for b in KATA_BINARIES if any(ln.endswith("/" + b) for ln in res.stdout.split())]


class PodLab:
    """Node agents, shared exports and pods of one test; :meth:`cleanup` undoes them all.

    ``guest`` and ``workload_qemu`` are callables so that a test that never starts a pod
    never builds the guest or fetches the QEMU.
    """

    def __init__(
        self,
        kata: str,
        writer_rate: int,
        guest: Callable[[], Any],
        workload_qemu: Callable[[], Any],
        workdir: Path | None = None,
        pod_accel: str = "tcg",
    ) -> None:
        self.kata = kata
        self.pod_accel = pod_accel
        self.writer_rate = writer_rate
        self._guest = guest
        self._workload_qemu = workload_qemu
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="katamaran-pods-"))
        self.sides: dict[str, NodeSide] = {}
        self.exports: list[NbdExport] = []
        self.pods: list[KataPod] = []

    def side(self, node: Any) -> NodeSide:
        """The node agent client of ``node`` (one per node: its cleanup covers the node)."""
        if node.name not in self.sides:
            self.sides[node.name] = NodeSide(node)
        return self.sides[node.name]

    def kind_for(self, node: Any) -> str:
        """``sandbox`` or ``runtime`` for this node; raises when neither can be honoured."""
        if self.kata == "sandbox":
            return "sandbox"
        found = kata_binaries(node)
        if not found:
            if self.kata == "runtime":
                raise KataUnavailable(node.name, KATA_BINARIES)
            return "sandbox"
        raise RuntimeNotImplemented(node.name, found)

    def start(self, node: Any, shared_storage: bool = False, **options: Any) -> KataPod:
        """Start a pod on ``node``; see :data:`POD_OPTIONS` for ``options``."""
        unknown = sorted(set(options) - set(POD_OPTIONS))
        if unknown:
            raise PodError(
                node.name,
                f"unknown kata_pod option(s) {', '.join(unknown)}; known: "
                + ", ".join(POD_OPTIONS),
            )
        kind = self.kind_for(node)
        side = self.side(node)
        if any(p.node.name == node.name and p.last_ack is None for p in self.pods):
            raise PodError(node.name, "already runs a pod of this test (one pod per node)")
        ip = str(options.get("ip", DEFAULT_POD_IP))
        guest, qemu = self._guest(), self._workload_qemu()
        export = None
        if shared_storage:
            export = NbdExport(self.workdir).start()
            self.exports.append(export)
            attached = side.call("nbd-attach", *export.attach_args())
            disk, create = str(attached.get("device") or export.device), []
        else:
            disk = f"{DISK_DIR}/src.qcow2"
            create = ["--disk-size", str(options.get("disk_size", DISK_SIZE)), "--prefill"]
        boot_timeout = float(options.get("boot_timeout", BOOT_TIMEOUT))
        args = [
            "workload-start",
            "--pod-ip", ip,
            "--kernel", str(guest.kernel),
            "--initrd", str(guest.initrd),
            "--disk", disk, *create,
            "--memory", str(int(options.get("memory", 128))),
            *qemu.nodeside_args(),
            "--accel", str(options.get("accel", self.pod_accel)),
            "--boot-timeout", str(boot_timeout),
        ]  # fmt: skip
        if options.get("writer", True):
            args += ["--writer", "--rate", str(int(options.get("writer_rate", self.writer_rate)))]
        if not options.get("tcfilter", True):
            args.append("--no-tcfilter")
        work = side.call(*args, timeout=boot_timeout + 300)
        pod = KataPod(
            node=node,
            ip=ip,
            qmp_socket=str(work["qmp"]),
            tap=TAP,
            drive_id=str(work["spec"].get("drive_id", DEFAULT_DRIVE_ID)),
            disk=disk,
            side=side,
            kind=kind,
            export=export,
            spec=dict(work["spec"]),
            argv=list(work["argv"]),
            boot_s=work.get("boot_time_s"),
        )
        self.pods.append(pod)
        return pod

    def cleanup(self) -> list[str]:
        """Stop everything on every node touched, then the exports; returns the problems.

        ``nodeside stop --purge`` kills the VMs by PID and removes netns, veth, tap,
        routes, NBD attachments and disks it recorded; it is idempotent.  Both nodes are
        stopped in parallel, and one failing does not stop the other's cleanup.
        """
        problems = []
        sides = list(self.sides.values())
        if sides:
            with ThreadPoolExecutor(len(sides)) as pool:
                futures = {
                    s.name: pool.submit(s.call, "stop", "--purge", timeout=180) for s in sides
                }
                for name, fut in futures.items():
                    try:
                        fut.result()
                    except Exception as exc:  # report, go on with the rest
                        problems.append(f"{name}: {exc}")
        for export in self.exports:
            try:
                export.stop()
            except Exception as exc:
                problems.append(f"qemu-nbd: {exc}")
        self.sides.clear()
        self.exports.clear()
        return problems

    def describe(self) -> str:
        """Every pod as JSON, for failure messages."""
        return json.dumps([p.as_dict() for p in self.pods], indent=1, default=str)
