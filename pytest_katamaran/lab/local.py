"""A one-machine migration lab: two real QEMUs in two netns "nodes", `katamaran` as processes.

Used by the integration tests and by the demo (`python -m pytest_katamaran.demo`).

The host kernel here lacks ipip and sch_plug, so katamaran warns and skips the
network cutover; everything else (QMP, NBD mirror, RAM, cleanup) is the real flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from katamaran.dest import SYSCTL_JOURNAL
from katamaran.errors import KatamaranError
from katamaran.lock import VMLock
from katamaran.qmp import Monitor
from pytest_katamaran.agent.node import process_state
from pytest_katamaran.checks.disk import DiskReport, last_ack, verify_writes
from pytest_katamaran.images.guest import GuestImage, kernel_cmdline
from pytest_katamaran.net.hostlab import HostLab, ipr
from pytest_katamaran.net.pod import GATEWAY_IP, DestTap, PodNet, prepare_dest_tap
from pytest_katamaran.qemu.binary import WorkloadQemu
from pytest_katamaran.qemu.sandbox import Sandbox
from pytest_katamaran.qemu.workload import SandboxSpec

VM_IP = "10.244.1.5"


class GuestPanicked(AssertionError):
    """The guest kernel panicked (QEMU then exits 0 because of -no-reboot).

    Seen after migrations under TCG in about 1 run in 20, with katamaran and with the
    bare QMP sequence alike (pytest_katamaran.bench), so it is reported as its own
    failure kind.
    """


def qmp(path: Path, command: str, timeout: float = 60, **args: object) -> Any:
    """One QMP command from outside (QEMU serves one client at a time: wait your turn)."""

    async def once() -> Any:
        mon = Monitor(path, timeout)
        await mon.connect()
        try:
            return await mon.execute(command, args or None)
        finally:
            await mon.close()

    return asyncio.run(once())


def run_state(box: Sandbox, path: Path | None = None) -> str | None:
    """QEMU's run state (asked on `path`, by default the box's client socket); None once
    the process has exited, GuestPanicked if its guest panicked (-no-reboot then ends it).

    A QEMU that exits while it is asked can close the monitor before poll() sees the exit
    (a SIGKILL in a syscall, 1 run under -n 2; a guest panic, the CI saw the monitor close
    under query-status): it is given 5 s to be gone, and is then reported as gone.  Alive
    and not answering, the error is real."""
    try:
        if box.alive():
            return qmp(path or box.qmp_path, "query-status", timeout=20)["status"]
    except KatamaranError:  # QMPClosed, or the socket refused: box.proc is set
        assert box.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            box.proc.wait(timeout=5)
        if box.alive():
            raise
    console = box.console_log.read_text(errors="replace") if box.spec else ""
    if "Kernel panic" in console:
        raise GuestPanicked(console[console.rfind("Kernel panic") :].splitlines()[0])
    return None


def accepts(path: Path) -> bool:
    """`path` is a UNIX socket that accepts a connection.  A QEMU's QMP socket file
    appears at bind(), a moment before listen(): a client in between is refused (CI,
    2026-12-01: `Connection refused` on a socket that existed)."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_for_path(path: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until the QMP socket `path` accepts connections; fails at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not accepts(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{path} never appeared: its process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def blocked_in_flock(path: Path) -> bool:
    """Whether some thread is blocked in flock on the file now at ``path`` (the `->`
    lines of /proc/locks name the inode they wait for): how a lock test knows its
    waiter is waiting, instead of sleeping and hoping."""
    try:
        inode = str(path.stat().st_ino)
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 6 and fields[1] == "->" and fields[6].split(":")[-1] == inode:
            return True
    return False


def wait_stopped(proc: subprocess.Popen, timeout: float) -> None:
    """Until `proc` is stopped (SIGSTOP: a failpoint, see katamaran.failpoint); fails at
    once if it exits first."""
    deadline = time.monotonic() + timeout
    while process_state(proc.pid) != "T":
        if proc.poll() is not None:
            raise AssertionError(f"pid {proc.pid} exited ({proc.returncode}) before it stopped")
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {proc.pid} did not stop within {timeout}s")
        time.sleep(0.01)


def wait_for_text(
    path: Path, text: str, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    log = path.read_text(errors="replace") if path.exists() else "(no output)"
    raise AssertionError(f"{text!r} not seen in {path} within {timeout}s:\n{log}")


@dataclass
class Rig:
    guest: GuestImage
    tmp: Path
    writer: bool = False
    shared: bool = False
    lab: HostLab = field(default_factory=HostLab)
    src: Sandbox = field(default_factory=Sandbox)
    dst: Sandbox = field(default_factory=Sandbox)
    procs: list[subprocess.Popen] = field(default_factory=list)
    copiers: dict[int, threading.Thread] = field(default_factory=dict)
    echo: bool = False
    disk_mib: int = 64
    fill_mib: int = 8  # data written before boot, so an idle migration has blocks to copy
    kata_pod: bool = False  # source QEMU in a pod netns behind Kata's tcfilter redirect
    # A second QMP monitor on each QEMU: katamaran uses it (Sandbox.qmp_path), so a
    # test can watch and poke QEMU on the primary one (spec.qmp_path) during a run.
    extra_monitor: bool = False
    # Calico-style routed taps on both nodes (gateway 169.254.1.1, the VM's /32 routed to
    # node A's tap): node A reaches the VM, and reaches it on node B after converge().
    routed: bool = False
    pod: PodNet | None = None
    dest_tap: DestTap | None = None
    disk_dir: Path | None = None  # where the source disk lives (a test's own small fs)
    disk_format: str = "qcow2"
    werror: str | None = None  # the source drive's write-error policy (QEMU's werror)
    blkdebug: Path | None = None  # blkdebug rules under the source drive (see SandboxSpec)
    # A second VM in another rig's lab (two migrations between the same two nodes):
    # give it that rig's `lab`, own_lab=False and its own tap, VM IP and tmp dir.
    own_lab: bool = True
    tap: str = "tap0_kata"
    vm_ip: str = VM_IP
    memory_mib: int = 128
    writer_rate: int | None = None  # the disk writer's writes/s (None: as fast as it can)
    dirty_mib_s: int = 0  # guest rewrites this many MiB of its RAM per second (memdirtier)
    # Every katamaran output line with the wall-clock time it was read (the benchmark
    # places its fixed costs by them): log name -> [(time.time(), line)].
    stamps: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    src_tap: DestTap | None = None
    # Another QEMU for both sides (binary, its firmware dir for -L), e.g. backports' 10.0
    # (pytest_katamaran.qemu.binary.backports_qemu) for what QEMU 7.2 lacks.
    qemu: WorkloadQemu | None = None
    # The destination QEMU's own netns (made by the caller, holding only lo; the rig adds
    # its tap there): a Kata QEMU lives in its pod's netns, where node traffic cannot
    # reach it.  None: node b's, as katamaran.
    dest_netns: str | None = None
    # The QEMUs' accelerator: "kvm" inside a lab node whose KVM runs a vCPU
    # (qemu.accel.pod_accel), else TCG; both sides take the source's.
    accel: str = "tcg"
    # Inside a TCG lab node a TCG guest is nested TCG, ~17x slower: the boot and
    # "destination ready" waits are fields.
    boot_timeout: float = 120.0
    ready_timeout: float = 60.0

    @property
    def src_disk(self) -> Path:
        return (self.disk_dir or self.tmp) / f"src.{self.disk_format}"

    @property
    def dst_disk(self) -> Path:
        return self.src_disk if self.shared else self.tmp / f"dst.{self.disk_format}"

    def up(self, incoming: str = "defer") -> None:
        if self.own_lab:
            self.lab.up()
        if self.kata_pod:
            # a second VM in another rig's lab gets its own pod netns and node-b tap
            name = "kmr-pod-" + self.lab.a.netns[-6:]
            if not self.own_lab:
                name += "-" + self.vm_ip.rsplit(".", 1)[-1]
            self.pod = PodNet(name, self.vm_ip, self.lab.a.netns, tap=self.tap)
            self.pod.setup()
            self.dest_tap = prepare_dest_tap(self.lab.b.netns, self.tap, pod_ip=self.vm_ip)
        elif self.routed:
            self.src_tap = prepare_dest_tap(self.lab.a.netns, pod_ip=self.vm_ip)
            self.src_tap.add_pod_route()
            self.dest_tap = prepare_dest_tap(self.lab.b.netns, pod_ip=self.vm_ip)
        else:
            for netns in [n.netns for n in self.lab.nodes] + [self.dest_netns]:
                if netns is None:
                    continue
                with ipr(netns) as ip:
                    ip.link("add", ifname=self.tap, kind="tuntap", mode="tap")
                    ip.link("set", index=ip.link_lookup(ifname=self.tap)[0], state="up")
        create = ["qemu-img", "create", "-q", "-f", self.disk_format]
        subprocess.run([*create, self.src_disk, f"{self.disk_mib}M"], check=True)
        # Data the guest did not write, so an idle migration still has blocks to copy.
        subprocess.run(
            [
                "qemu-io",
                "-f",
                self.disk_format,
                "-c",
                f"write -P 0x5a {self.disk_mib - self.fill_mib}M {self.fill_mib}M",
                self.src_disk,
            ],
            check=True,
            capture_output=True,
        )
        if not self.shared:
            subprocess.run([*create, self.dst_disk, f"{self.disk_mib}M"], check=True)
        writer = "/dev/vda" if self.writer else None
        load = {"rate": self.writer_rate, "dirty": self.dirty_mib_s}
        if self.pod:
            append = kernel_cmdline(
                ip=self.pod.guest_ip, gw=self.pod.gateway, writer=writer, **load
            )
        elif self.routed:
            append = kernel_cmdline(ip=f"{self.vm_ip}/32", gw=GATEWAY_IP, writer=writer, **load)
        else:
            append = kernel_cmdline(ip=f"{self.vm_ip}/24", writer=writer, **load)
        spec = SandboxSpec(
            sandbox_id="kmrtest",
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            append=append,
            run_dir=self.tmp / "a",
            disk=self.src_disk,
            disk_format=self.disk_format,
            werror=self.werror,
            blkdebug=self.blkdebug,
            extra_monitor=self.extra_monitor,
            tap=self.tap,
            memory_mib=self.memory_mib,
            accel=self.accel,
        )
        if self.qemu is not None:
            spec.qemu_binary = self.qemu.binary
            spec.extra_args = ["-L", self.qemu.datadir] if self.qemu.datadir else []
        if self.pod and self.pod.mac:
            spec.mac = self.pod.mac  # Kata gives the VM NIC the pod eth0's MAC
        self.src.start(spec, netns=self.pod.netns if self.pod else self.lab.a.netns)
        self.src.wait_ready(self.boot_timeout)
        dst_spec = spec.for_destination(
            disk=self.dst_disk, incoming=incoming, run_dir=self.tmp / "b"
        )
        self.dst.start(dst_spec, netns=self.dest_netns or self.lab.b.netns)

    def forget_journals(self) -> None:
        """Remove what a killed katamaran saved next to its lock for this rig's VMs (the
        source's settings, the destination's sysctls): their QEMUs end with the rig, and
        /run/lock outlives the test (81 such files here in two days before this)."""
        for box in (self.src, self.dst):
            if box.spec is None:
                continue
            with contextlib.suppress(KatamaranError), VMLock(box.qmp_path) as lock:
                lock.clear_state()
                lock.clear_state(SYSCTL_JOURNAL)

    def katamaran(
        self, node: str, *args: str, log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Run katamaran in a node's netns; its output goes to `log` (and the terminal if
        echo).  `env` adds to this process's environment (a failpoint, see
        katamaran.failpoint)."""
        proc = self.lab.popen(
            node,
            [sys.executable, "-m", "katamaran", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )
        self.procs.append(proc)
        path = self.tmp / log
        # A new process starts a new log (the file is truncated below): a second run in one
        # rig must not find the first run's lines (wait_for_line would return at once).
        stamps = self.stamps[log] = []
        prefix = f"[{log.removesuffix('.log')}] "

        def copy() -> None:
            with open(path, "w") as out:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = raw.decode(errors="replace")
                    stamps.append((time.time(), line))
                    out.write(line)
                    out.flush()
                    if self.echo:
                        sys.stderr.write(prefix + line)

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        self.copiers[proc.pid] = thread
        return proc

    def start_dest(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        args = ["-mode", "dest", "-qmp", str(self.dst.qmp_path), "-tap", self.tap]
        if self.shared:
            args.append("-shared-storage")
        args += ["-tunnel-hold", "0.2", *extra]
        proc = self.katamaran("b", *args, log="dest.log", env=env)
        self.wait_for_line("dest.log", "destination ready", self.ready_timeout, proc)
        return proc

    def wait_for_line(self, log: str, text: str, timeout: float, proc: subprocess.Popen) -> float:
        """When (time.time()) katamaran printed `text`; checked every 5 ms, not 50:
        the benchmark counts this wait in katamaran's total."""
        deadline = time.monotonic() + timeout
        lines = self.stamps.setdefault(log, [])
        while time.monotonic() < deadline:
            for at, line in list(lines):
                if text in line:
                    return at
            if proc.poll() is not None and not self.copiers[proc.pid].is_alive():
                break
            time.sleep(0.005)
        raise AssertionError(
            f"{text!r} not seen in {self.tmp / log} within {timeout}s:\n{self.log(log)}"
        )

    def start_source(self, dest_ip: str = "10.0.0.2", *extra: str) -> subprocess.Popen:
        args = ["-mode", "source", "-qmp", str(self.src.qmp_path)]
        args += ["-dest-ip", dest_ip, "-vm-ip", self.vm_ip, "-tunnel-hold", "0.2"]
        if self.shared:
            args.append("-shared-storage")
        return self.katamaran("a", *args, *extra, log="source.log")

    def log(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text(errors="replace") if path.exists() else ""

    def finish(self, proc: subprocess.Popen, timeout: float = 180) -> int:
        try:
            rc = proc.wait(timeout)
            self.copiers[proc.pid].join(5)
            return rc
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(
                f"katamaran did not finish in {timeout}s\nsource:\n{self.log('source.log')}"
                f"\ndest:\n{self.log('dest.log')}"
            ) from None

    def stamped_log(self, name: str) -> str:
        """A katamaran log with each line stamped on arrival (see ``stamps``)."""
        # the `[<epoch>] <line>` form nodectl.stamped() reads (the node agent stamps alike)
        return "\n".join(f"[{at:.6f}] {line.rstrip()}" for at, line in self.stamps.get(name, []))

    def converge(self) -> dict[str, float]:
        """The CNI's step after a move (routed rig): node A routes the VM to node B, node B
        to its tap.  Returns when each node converged (this host's clock)."""
        if self.dest_tap is None:
            raise RuntimeError("converge() needs a rig with routed=True or kata_pod=True")
        self.dest_tap.add_pod_route()
        at_b = time.time()
        if self.src_tap is not None:
            with ipr(self.lab.a.netns) as ip:
                ip.route("replace", dst=f"{self.vm_ip}/32", gateway=self.lab.b.ipv4)
        return {"node A": time.time(), "node B": at_b}

    def check_writes_survived(
        self,
        poll: Callable[[], object] = lambda: None,
        timeout: float = 60,
        *,
        on: Literal["dst", "src"] = "dst",
    ) -> DiskReport:
        """The writing guest runs `on` one side (the destination after a migration, the
        source after one was given up): its writer went on there, and every write the
        guest acknowledged (on either side) is on that side's disk.

        Stops both QEMUs (the disk is read with nothing writing it).  `poll` runs while
        waiting for the next acknowledgement, e.g. to report a dead guest.
        """
        runs, disk, side = (
            (self.dst, self.dst_disk, "destination")
            if on == "dst"
            else (self.src, self.src_disk, "source")
        )
        acked_on_source = last_ack(self.src.console_log)
        deadline = time.monotonic() + timeout
        while last_ack(runs.console_log) <= acked_on_source and time.monotonic() < deadline:
            poll()
            time.sleep(0.2)
        acked = max(acked_on_source, last_ack(runs.console_log))
        assert acked > acked_on_source, f"the guest did not keep writing on the {side}"
        self.src.stop()
        self.dst.stop()
        report = verify_writes(disk, acked)
        assert report.ok, str(report)
        print(f"acked on source {acked_on_source}, total {acked} on the {side}: {report}")
        return report

    def status(self, box: Sandbox) -> str:
        """QEMU's run state; if QEMU is gone, say so with its own last words."""
        state = run_state(box)
        if state is not None:
            return state
        err = box.spec.sandbox_dir / "qemu.stderr" if box.spec else None
        tail = err.read_text(errors="replace")[-1500:] if err and err.exists() else ""
        code = box.proc.returncode if box.proc else None
        console = box.console_log.read_text(errors="replace")[-3000:] if box.spec else ""
        raise AssertionError(f"QEMU exited ({code}); stderr:\n{tail}\nguest console:\n{console}")

    def down(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.forget_journals()
        self.src.stop()
        self.dst.stop()
        for part in (self.pod, self.dest_tap, self.src_tap):
            if part is not None:
                part.teardown()
        if self.own_lab:
            self.lab.teardown()
        for disk in {self.src_disk, self.dst_disk}:
            disk.unlink(missing_ok=True)  # GiB-sized: don't leave them to pytest's tmp dirs
