"""The ``--nodes=qemu`` backend: the guide's two lab nodes as two local QEMU processes.

Why a backend of its own: the harness must boot, reach and always tear down the very
nodes the guide's scripts start (``node_vm.node_argv`` builds both), but with free ports
(pytest-xdist runs several labs side by side), throwaway overlays/seeds/keys, and a clear
message when a node does not come up (QEMU argv + serial console tail).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_katamaran.images.guest import cache_root
from pytest_katamaran.images.node import NodeImage, build_image, create_overlay
from pytest_katamaran.images.seed import DEFAULT_USER, write_seed
from pytest_katamaran.qemu.binary import WorkloadQemu, node_qemu
from pytest_katamaran.qemu.node import (
    BOOT_TIMEOUTS,
    PRIVATE_IPS,
    PRIVATE_PREFIX,
    ROLES,
    NodeBootError,
    NodeProcess,
    NodeSpec,
    NodeStalled,
    free_port,
    nic_macs,
    node_cpus,
    wait_listening,
)
from pytest_katamaran.ssh import SSHClient, generate_keypair

Progress = Callable[[str], None]
SSH_TIMEOUTS = {"debian": 90.0, "ubuntu": 300.0}
# QEMU messages meaning "a port we picked was taken meanwhile": pick others and retry.
_PORT_RACE = ("Could not set up host forwarding rule", "Address already in use")
_LAUNCH_TRIES = 3
# Boots per start(): one more after a stalled CPU (NodeStalled), never for other failures.
_BOOT_TRIES = 2


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class QemuNode:
    """One booted node as tests see it (see ``backend.Node``)."""

    name: str
    ssh: SSHClient
    private_ip: str
    ssh_port: int
    serial_log: Path
    pid: int | None = None
    boot_seconds: float = 0.0  # QEMU start -> KATAMARAN-NODE-READY on the console
    ssh_seconds: float = 0.0  # QEMU start -> SSH runs a command
    argv: list[str] = field(default_factory=list)


def _accel(config: Any) -> tuple[str, str | None]:
    """(accel, cpu) from the resolved config: ``config.accelerator`` if the plugin set it."""
    acc = getattr(config, "accelerator", None)
    if acc is not None:
        return str(acc.name), getattr(acc, "cpu", None)
    name = getattr(config, "accel", "tcg")
    if name in ("kvm", "tcg"):
        return name, None
    from pytest_katamaran.qemu.accel import choose_accel

    chosen = choose_accel(name)
    return chosen.name, chosen.cpu


def clock_problem(uptime_s: float, elapsed_lo: float, elapsed_hi: float) -> str | None:
    """Why a node's clock cannot be right, or None: its uptime against the host's clock.

    ``elapsed_lo``/``elapsed_hi`` are the host's seconds since QEMU started, taken just
    before and just after the node read its uptime.  The kernel starts after firmware
    (seconds under TCG), so the uptime must lie between half the elapsed time and the
    elapsed time itself; a TSC miscalibrated at boot (the nodes run ``tsc=reliable``,
    which turns off the kernel's clocksource watchdog) is off by far more than that.
    """
    if uptime_s > elapsed_hi + 1.0:
        return f"uptime {uptime_s:.1f} s after {elapsed_hi:.1f} s of real time: its clock runs fast"
    if uptime_s < 0.5 * elapsed_lo:
        return f"uptime {uptime_s:.1f} s after {elapsed_lo:.1f} s of real time: its clock runs slow"
    return None


def check_clock(proc: NodeProcess, client: SSHClient) -> None:
    """Fail the boot, naming the figures, when the node's TSC was miscalibrated."""
    lo = time.monotonic() - proc.started_at
    out = client.run("cat /proc/uptime", timeout=60).stdout
    hi = time.monotonic() - proc.started_at
    problem = clock_problem(float(out.split()[0]), lo, hi)
    if problem:
        raise NodeBootError(
            proc.describe_failure(f"{proc.spec.name}: TSC miscalibrated at boot ({problem})")
        )


class QemuNodes:
    """Node A (source, 10.0.0.1) and node B (destination, 10.0.0.2) under QEMU."""

    def __init__(
        self,
        config: Any,
        *,
        progress: Progress | None = None,
        boot_timeout: float | None = None,
        ssh_timeout: float | None = None,
        roles: tuple[str, ...] = ROLES,
    ) -> None:
        self.config = config
        # ("a",): one node alone, for tests that need a Debian kernel but no second node
        self.roles = roles
        self.image_kind: str = getattr(config, "node_image", "debian") or "debian"
        self.progress = progress or _stderr_progress
        self.boot_timeout = boot_timeout or BOOT_TIMEOUTS.get(self.image_kind, 300.0)
        self.ssh_timeout = ssh_timeout or SSH_TIMEOUTS.get(self.image_kind, 120.0)
        results = Path(getattr(config, "results_dir", None) or Path.cwd() / "results")
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.log_dir = results / "nodes" / worker
        self.workdir: Path | None = None
        self.image: NodeImage | None = None
        self.qemu = WorkloadQemu("qemu-system-x86_64", "", "")  # resolved by start()
        self._procs: dict[str, NodeProcess] = {}
        self._nodes: dict[str, QemuNode] = {}

    # ------------------------------------------------------------------ API

    @property
    def node_a(self) -> QemuNode:
        """The source node (raises before ``start()``)."""
        return self._node("a")

    @property
    def node_b(self) -> QemuNode:
        """The destination node."""
        return self._node("b")

    def _node(self, role: str) -> QemuNode:
        try:
            return self._nodes[role]
        except KeyError:
            raise RuntimeError(f"node-{role} is not running: call start() first") from None

    def serial_logs(self) -> dict[str, Path]:
        """Serial console log of each node launched so far (they outlive ``stop()``)."""
        return {p.spec.name: p.spec.serial_log for p in self._procs.values()}

    def pids(self) -> list[int]:
        """PIDs of the QEMU processes we launched (running or not)."""
        return [p.pid for p in self._procs.values() if p.pid is not None]

    def keep_instructions(self) -> str:
        """How to clean up nodes left running by --keep-nodes-on-failure."""
        pids = " ".join(str(p) for p in self.pids())
        return f"QEMU PIDs: {pids}; when done: kill {pids}; rm -rf {self.workdir}"

    def start(self) -> None:
        """Build/fetch the image, boot A (link listener) then B, wait for READY and SSH.

        Whatever fails (or Ctrl-C) stops everything started so far before re-raising.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill both QEMUs by PID and delete overlays, seeds and keys. Safe to call twice."""
        for node in self._nodes.values():
            with contextlib.suppress(Exception):
                node.ssh.close()
        for proc in self._procs.values():
            proc.kill()
        self._nodes.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # ------------------------------------------------------------------ internals

    def _start(self) -> None:
        t0 = time.monotonic()
        accel, cpu = _accel(self.config)
        self.image = build_image(self.image_kind, progress=self.progress)
        self.qemu, note = node_qemu(cache_root())
        if note:
            self.progress(f"katamaran: WARNING: {note}")
        self.workdir = Path(tempfile.mkdtemp(prefix="katamaran-nodes-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        key = generate_keypair(self.workdir / "id_rsa")
        pubkey = key.with_name(key.name + ".pub").read_text().strip()
        self._write_disks(pubkey)
        self.progress(
            f"katamaran: lab prepared in {time.monotonic() - t0:.1f}s "
            f"({self.image.kind} image, {accel}, {self._cpus(accel)} vCPU(s) each, "
            f"QEMU {self.qemu.version}); booting "
            + " and ".join(f"node-{role}" for role in self.roles)
        )
        self._boot(accel, cpu, pubkey)
        for role in self.roles:
            proc = self._procs[role]
            client = SSHClient(
                "127.0.0.1",
                proc.spec.ssh_port,
                user=DEFAULT_USER,
                key_path=key,
                connect_timeout=15.0,
                name=proc.spec.name,
            )
            try:
                client.wait_ready(self.ssh_timeout)
            except TimeoutError as e:
                raise NodeBootError(proc.describe_failure(f"{proc.spec.name}: {e}")) from e
            if self.image_kind == "debian":
                check_clock(proc, client)
            node = QemuNode(
                name=proc.spec.name,
                ssh=client,
                private_ip=proc.spec.private_ip,
                ssh_port=proc.spec.ssh_port,
                serial_log=proc.spec.serial_log,
                pid=proc.pid,
                boot_seconds=proc.ready_seconds or 0.0,
                ssh_seconds=time.monotonic() - proc.started_at,
                argv=list(proc.argv),
            )
            self._nodes[role] = node
            self.progress(f"katamaran: {node.name}: SSH ready after {node.ssh_seconds:.1f}s")

    def _write_disks(self, pubkey: str) -> None:
        """A fresh overlay and cloud-init seed per node (a new boot starts from scratch)."""
        assert self.image is not None and self.workdir is not None
        for role in self.roles:
            overlay = self.workdir / f"node-{role}.qcow2"
            overlay.unlink(missing_ok=True)
            create_overlay(self.image, overlay)
            write_seed(
                self.workdir / f"node-{role}-seed.iso",
                hostname=f"node-{role}",
                authorized_keys=[pubkey],
                private_ip=f"{PRIVATE_IPS[role]}/{PRIVATE_PREFIX}",
                nic_macs=nic_macs(role),
                instance_id=f"katamaran-node-{role}-{os.getpid()}",
            )

    def _boot(self, accel: str, cpu: str | None, pubkey: str) -> None:
        """Launch the nodes and wait for READY; boot all of them again after a stalled CPU.

        A stalled boot (``NodeStalled``: a TCG vCPU whose timer stopped firing) never
        recovers, and a fresh QEMU comes up normally.  Every node restarts, because node
        B's link is a connection to node A's socket.  The stalled console is kept next to
        the new one and named in the warning; any other failure is raised at once.
        """
        for attempt in range(1, _BOOT_TRIES + 1):
            self._launch_both(accel, cpu)
            try:
                for role in self.roles:
                    proc = self._procs[role]
                    seconds = proc.wait_ready(self.boot_timeout)
                    self.progress(f"katamaran: {proc.spec.name}: READY after {seconds:.1f}s")
                return
            except NodeStalled as e:
                if attempt == _BOOT_TRIES:
                    raise
                for proc in self._procs.values():
                    proc.kill()
                kept = []
                for proc in self._procs.values():
                    log = proc.spec.serial_log
                    if log.exists():
                        kept.append(log.rename(log.with_suffix(f".stalled-{attempt}.log")))
                self.progress(
                    f"katamaran: WARNING: {e.args[0].splitlines()[0]}; booting "
                    f"{' and '.join(p.spec.name for p in self._procs.values())} again "
                    f"(attempt {attempt + 1} of {_BOOT_TRIES}); the stalled consoles: "
                    + ", ".join(str(k) for k in kept)
                )
                self._write_disks(pubkey)

    def _spec(self, role: str, accel: str, cpu: str | None, link_port: int) -> NodeSpec:
        assert self.image is not None and self.workdir is not None
        return NodeSpec(
            role=role,
            image=self.image,
            disk=self.workdir / f"node-{role}.qcow2",
            seed=self.workdir / f"node-{role}-seed.iso",
            serial_log=self.log_dir / f"node-{role}.serial.log",
            ssh_port=free_port(),
            link_port=link_port,
            accel=accel,
            cpu=cpu,
            qemu=self.qemu.binary,
            qemu_datadir=self.qemu.datadir,
            smp=self._cpus(accel),
        )

    def _cpus(self, accel: str) -> int:
        """Each node's vCPUs (qemu.node.node_cpus: one where pods may run under its KVM)."""
        tuning = getattr(self.config, "tuning", None)
        pod_accel = getattr(self.config, "pod_accel", "tcg")
        return node_cpus(self.image.kind, accel, pod_accel, getattr(tuning, "node_cpus", None))

    def _launch_both(self, accel: str, cpu: str | None) -> None:
        """A first (it listens on the link), B once A's socket listens; both boot in parallel.

        Free ports are picked just before launch; if another process grabbed one in the
        meantime QEMU exits at once and we retry with new ports.
        """
        for attempt in range(1, _LAUNCH_TRIES + 1):
            link_port = free_port()
            try:
                for role in self.roles:
                    proc = NodeProcess(self._spec(role, accel, cpu, link_port), self.progress)
                    self._procs[role] = proc
                    proc.launch()
                    if role == "a":
                        wait_listening(link_port, timeout=30.0, proc=proc)
                time.sleep(0.3)
                for proc in self._procs.values():
                    proc.check()  # QEMU died at once: a port race (retried) or a real error
                return
            except NodeBootError as e:
                for proc in self._procs.values():
                    proc.kill()
                if attempt == _LAUNCH_TRIES or not any(m in str(e) for m in _PORT_RACE):
                    raise
                self.progress(f"katamaran: port collision, retrying ({e.args[0].splitlines()[0]})")
