"""The one source of truth for a lab node's QEMU command line, and the testenv CLI.

Why one module: the pytest backend (``backend.qemu.QemuNodes``) and the guide's scripts
(``testenv/setup.sh``, ``testenv/start-node-{a,b}.sh``) must boot the very same nodes:
NIC1 user-mode NAT with SSH forwarded from 127.0.0.1 (enp0s3), NIC2 a point-to-point
socket link between the two QEMUs (enp0s4, 10.0.0.1 <-> 10.0.0.2), a COW disk, the
cloud-init seed and a serial console logged to a file.

CLI (the shell scripts are thin front-ends over it)::

    python -m pytest_katamaran.qemu.node setup [--image debian|ubuntu] [--accel auto|kvm|tcg]
    python -m pytest_katamaran.qemu.node start a|b [--foreground]
    python -m pytest_katamaran.qemu.node stop a|b
    python -m pytest_katamaran.qemu.node check-deps [--image debian|ubuntu]

State lives in ``$KATAMARAN_TESTENV_DIR`` (default ``<checkout>/testenv``): the key
``kata_test_rsa`` as in the guide, and ``.state/`` (manifest, overlays, seeds, logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_katamaran.images.guest import cache_root
from pytest_katamaran.images.node import (
    IMAGE_KINDS,
    SCRATCH_LABEL,
    DebianImage,
    NodeImage,
    NodeImageError,
    build_image,
    create_overlay,
    image_from_dict,
    is_current,
    overlay_fits,
)
from pytest_katamaran.logtail import tail
from pytest_katamaran.net.listening import is_listening
from pytest_katamaran.qemu.binary import node_qemu
from pytest_katamaran.qemu.process import start_qemu

Progress = Callable[[str], None]

QEMU_BINARY = "qemu-system-x86_64"
ROLES = ("a", "b")
PRIVATE_IPS = {"a": "10.0.0.1", "b": "10.0.0.2"}
PRIVATE_PREFIX = 24
NAT_MACS = {"a": "52:54:00:12:34:0a", "b": "52:54:00:12:34:0b"}
PRIVATE_MACS = {"a": "52:54:00:12:35:0a", "b": "52:54:00:12:35:0b"}
# PCI slots 3 and 4: systemd (Ubuntu) and node-boot (Debian) both name them enp0s3/enp0s4.
NAT_SLOT, PRIVATE_SLOT, DISK_SLOT, SEED_SLOT = 3, 4, 5, 6
HOSTROOT_TAG = "hostroot"
READY_MARKER = "KATAMARAN-NODE-READY"
FAILED_MARKER = "KATAMARAN-NODE-FAILED"
# What the node kernel prints every ~21 s while a CPU holds up an RCU grace period.  In
# CI on 2026-12-03 node B's vCPU 1 sat idle with a timer that never fired under TCG
# ("rcu_preempt kthread timer wakeup didn't happen ... Possible timer handling issue on
# cpu=1"): eight reports, no further boot progress, READY never came.  Three reports
# before READY (a minute without a grace period) mark such a boot as lost.
STALL_MARKER = "detected stalls on CPUs"
STALL_REPORTS = 3
# The guide's ports; the socket link port is ours (the guide's scripts hard-coded one too).
TESTENV_SSH_PORTS = {"a": 2222, "b": 2223}
TESTENV_LINK_PORT = 1234
TESTENV_ENV = "KATAMARAN_TESTENV_DIR"
SETUP_HINT = "Run ./testenv/setup.sh first."
# Offline debian nodes under TCG: 2 vCPUs each (MTTCG), so the nested workload's QEMU,
# its I/O thread, ping and katamaran do not queue behind one vCPU (with 1, the nested
# guest answered ~60 pings/s and fell minutes behind); RAM for a nested workload VM.
# Ubuntu nodes (KVM laptop) get what Kata needs.
RESOURCES = {"debian": (2, 1536), "ubuntu": (2, 4096)}
BOOT_TIMEOUTS = {"debian": 180.0, "ubuntu": 900.0}
# ...but one vCPU for a TCG node whose pods may run under the node's KVM: TCG emulates the
# SVM that KVM uses there, and with two node vCPUs (MTTCG) that node corrupted its own
# memory (2026-12-03: a node booting guests under its KVM panicked with "corrupted stack
# end" in its init after 60 boots; others reset after 11 and 16 or hung after 5); with
# one, 95 boots ran clean. A pod under KVM needs no second vCPU: the e2e at the guide's
# 10 ms passed with 1 (README "Pods under the node's KVM").
NESTED_KVM_NODE_CPUS = 1
# TCG's -cpu max is an AMD CPU without invariant TSC, so a 2-vCPU node kernel declares
# its TSCs "unsynchronized" and falls back to the HPET: every clock_gettime in the node
# becomes a syscall plus an emulated MMIO read.  TCG's TSC is one global host-derived
# counter (monotonic across vCPUs), so it is reliable in fact; see README "nested lab".
NODE_CLOCK_ARGS = ("tsc=reliable",)


def nic_macs(role: str) -> dict[str, str]:
    """A node's NIC MACs by purpose: the seed's network-config matches NICs by them."""
    return {"nat": NAT_MACS[role], "private": PRIVATE_MACS[role]}


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def host_python() -> str:
    """The interpreter running us (not resolved: a venv's python must stay the venv's)."""
    return os.path.abspath(sys.executable)


@dataclass(frozen=True)
class NodeSpec:
    """Everything that shapes one node's QEMU process."""

    role: str  # "a" (source, listens on the link) | "b" (destination, connects)
    image: NodeImage
    disk: Path  # qcow2 COW overlay: scratch disk (debian) or root disk (ubuntu)
    seed: Path  # NoCloud ISO labelled cidata
    serial_log: Path
    ssh_port: int
    link_port: int
    accel: str = "tcg"
    cpu: str | None = None  # None: "host" under KVM, "max" under TCG
    smp: int | None = None
    memory_mib: int | None = None
    python: str = ""  # interpreter the debian node runs node-cloudinit with; "" = ours
    qemu: str = QEMU_BINARY
    qemu_datadir: str = ""  # that QEMU's own firmware (-L); "" for the system QEMU
    pidfile: Path | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be tcg or kvm, got {self.accel!r}")

    @property
    def name(self) -> str:
        """``node-a`` / ``node-b`` (also the hostname)."""
        return f"node-{self.role}"

    @property
    def vcpus(self) -> int:
        """The vCPUs the node boots with: ``smp`` if set, else the image's (RESOURCES)."""
        return self.smp or RESOURCES[self.image.kind][0]

    @property
    def private_ip(self) -> str:
        """Address on the private link, without prefix."""
        return PRIVATE_IPS[self.role]

    @property
    def private_cidr(self) -> str:
        """Address on the private link, ADDR/LEN."""
        return f"{self.private_ip}/{PRIVATE_PREFIX}"

    @property
    def link_mode(self) -> str:
        """Node A listens on the link port, node B connects to it (start A first)."""
        return "listen" if self.role == "a" else "connect"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout/stderr, next to the serial log."""
        return self.serial_log.with_name(f"{self.name}.qemu.log")


def debian_cmdline(spec: NodeSpec) -> str:
    """Kernel command line for node-init/node-boot (space-separated: no spaces in paths)."""
    assert isinstance(spec.image, DebianImage)
    python = spec.python or host_python()
    values = {
        "katamaran.root": HOSTROOT_TAG,
        "katamaran.kver": spec.image.kernel_version,
        "katamaran.moddir": str(spec.image.modules_dir),
        "katamaran.privip": spec.private_cidr,
        "katamaran.python": python,
        "katamaran.scratch": SCRATCH_LABEL,
    }
    for key, value in values.items():
        if any(c.isspace() for c in value):
            raise ValueError(f"{key}={value!r}: paths with spaces cannot go on a kernel cmdline")
    parts = ["console=ttyS0,115200", "panic=-1", "quiet", "rdinit=/init", *NODE_CLOCK_ARGS]
    return " ".join(parts + [f"{k}={v}" for k, v in values.items()])


def node_cpus(kind: str, node_accel: str, pod_accel: str, requested: int | None = None) -> int:
    """vCPUs of a lab node: ``requested`` if given, else one for a TCG node whose pods may
    run under its KVM (``pod_accel`` auto or kvm; see NESTED_KVM_NODE_CPUS), else the
    image's (RESOURCES)."""
    if requested:
        return requested
    if node_accel == "tcg" and pod_accel != "tcg":
        return NESTED_KVM_NODE_CPUS
    return RESOURCES[kind][0]


def node_argv(spec: NodeSpec) -> list[str]:
    """The node's complete QEMU argv (used by QemuNodes and the start scripts alike)."""
    kind = spec.image.kind
    mem = RESOURCES[kind][1]
    cpu = spec.cpu or ("host" if spec.accel == "kvm" else "max")
    argv = [
        spec.qemu,
        "-name", f"{spec.name},process=katamaran-{spec.name}",
        "-M", "pc",
        "-accel", spec.accel,
        "-cpu", cpu,
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mib or mem),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-chardev", f"file,id=serial0,path={spec.serial_log}",
        "-serial", "chardev:serial0",
        # NIC1 (enp0s3): user-mode NAT, SSH reachable only from this host
        "-netdev", f"user,id=nat,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22",
        # romfile=: no iPXE option ROM (nodes never netboot; SeaBIOS runs faster without)
        "-device",
        f"virtio-net-pci,netdev=nat,mac={NAT_MACS[spec.role]},addr={NAT_SLOT:#x},romfile=",
        # NIC2 (enp0s4): the private inter-node link, a TCP socket between the two QEMUs
        "-netdev", f"socket,id=priv,{spec.link_mode}=127.0.0.1:{spec.link_port}",
        "-device",
        f"virtio-net-pci,netdev=priv,mac={PRIVATE_MACS[spec.role]},addr={PRIVATE_SLOT:#x},romfile=",
        "-drive", f"file={spec.disk},if=none,id=disk0,format=qcow2,discard=unmap",
        "-device", f"virtio-blk-pci,drive=disk0,addr={DISK_SLOT:#x}",
        "-drive", f"file={spec.seed},if=none,id=seed,format=raw,readonly=on",
        "-device", f"virtio-blk-pci,drive=seed,addr={SEED_SLOT:#x}",
        "-object", "rng-random,id=rng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng0",
    ]  # fmt: skip
    if isinstance(spec.image, DebianImage):
        argv += [
            "-kernel", str(spec.image.kernel),
            "-initrd", str(spec.image.initrd),
            "-append", debian_cmdline(spec),
            # this host's root, read-only; remap: / spans several host file systems
            "-fsdev",
            f"local,id={HOSTROOT_TAG},path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev={HOSTROOT_TAG},mount_tag={HOSTROOT_TAG}",
        ]  # fmt: skip
    if spec.qemu_datadir:
        argv += ["-L", spec.qemu_datadir]
    if spec.pidfile is not None:
        argv += ["-pidfile", str(spec.pidfile)]
    return argv


# --------------------------------------------------------------------------- processes


class NodeBootError(RuntimeError):
    """A node did not come up; the message carries the QEMU argv and the log tails."""


class NodeStalled(NodeBootError):
    """The node kernel kept reporting a stalled CPU before READY.

    Seen under TCG as a vCPU whose timer stops firing during boot; the boot never
    recovers, while a fresh QEMU process comes up normally, so the caller may boot again.
    """


class NodeProcess:
    """One node's QEMU process: launch, wait for the READY marker, kill by PID."""

    def __init__(self, spec: NodeSpec, progress: Progress = _stderr_progress) -> None:
        self.spec = spec
        self.argv = node_argv(spec)
        self.progress = progress
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        """QEMU's PID once launched."""
        return self.proc.pid if self.proc is not None else None

    def launch(self) -> None:
        """Start QEMU in its own session (a Ctrl-C aimed at pytest does not hit it)."""
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        self.spec.serial_log.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        self.proc = start_qemu(self.argv, self.spec.qemu_log)
        self.progress(
            f"katamaran: {self.spec.name}: boot started (PID {self.proc.pid}, "
            f"{self.spec.image.kind}, {self.spec.accel}, ssh 127.0.0.1:{self.spec.ssh_port})"
        )

    def describe_failure(self, headline: str) -> str:
        """Headline + QEMU argv + QEMU output + serial console tail."""
        return (
            f"{headline}\n"
            f"QEMU argv: {shlex.join(self.argv)}\n"
            f"QEMU output ({self.spec.qemu_log}):\n{tail(self.spec.qemu_log, 10)}\n"
            f"serial log ({self.spec.serial_log}) tail:\n{tail(self.spec.serial_log)}"
        )

    def check(self) -> bool:
        """True once READY is on the console; raises if the node failed or QEMU exited."""
        try:
            text = self.spec.serial_log.read_text(errors="replace")
        except OSError:
            text = ""
        if READY_MARKER in text:
            if self.ready_seconds is None:
                self.ready_seconds = time.monotonic() - self.started_at
            return True
        if FAILED_MARKER in text:
            why = text.split(FAILED_MARKER, 1)[1].lstrip(": ").splitlines()[0]
            raise NodeBootError(self.describe_failure(f"{self.spec.name} failed to boot: {why}"))
        stalls = text.count(STALL_MARKER)
        if stalls >= STALL_REPORTS:
            raise NodeStalled(
                self.describe_failure(
                    f"{self.spec.name}: its kernel reported a stalled CPU {stalls} times "
                    f"before {READY_MARKER} (a vCPU whose timer stopped firing)"
                )
            )
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise NodeBootError(
                self.describe_failure(f"{self.spec.name}: QEMU exited (rc={rc}) before READY")
            )
        return False

    def wait_ready(self, timeout: float) -> float:
        """Seconds from launch to READY; NodeBootError with the log tails on timeout."""
        deadline = self.started_at + timeout
        while not self.check():
            if time.monotonic() > deadline:
                raise NodeBootError(
                    self.describe_failure(
                        f"{self.spec.name} did not print {READY_MARKER} within {timeout:.0f}s"
                    )
                )
            time.sleep(0.1)
        assert self.ready_seconds is not None
        return self.ready_seconds

    def running(self) -> bool:
        """Whether QEMU is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, by PID; reaps it. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_busy(port: int) -> bool:
    """Whether something already listens on / holds 127.0.0.1:port (as QEMU would bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_listening(port: int, timeout: float, proc: NodeProcess | None = None) -> None:
    """Until node A's QEMU listens on the link port (it does so before the guest boots)."""
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if proc is not None:
            proc.check()  # raises if A's QEMU died
        if time.monotonic() > deadline:
            raise NodeBootError(f"nothing listens on the private link 127.0.0.1:{port}")
        time.sleep(0.05)


# --------------------------------------------------------------------------- testenv


def repo_root() -> Path:
    """The checkout this module lives in."""
    return Path(__file__).resolve().parents[2]


class MissingFile(RuntimeError):
    """A file setup.sh creates is missing."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{_display(path)} not found. {SETUP_HINT}")
        self.path = path


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Testenv:
    """The guide's on-disk layout: key in testenv/, everything else in testenv/.state/."""

    __test__ = False  # not a pytest test class, despite the name
    root: Path

    @classmethod
    def default(cls) -> Testenv:
        """``$KATAMARAN_TESTENV_DIR`` or ``<checkout>/testenv``."""
        env = os.environ.get(TESTENV_ENV)
        return cls(Path(env).absolute() if env else repo_root() / "testenv")

    @property
    def state(self) -> Path:
        """Generated files (gitignored)."""
        return self.root / ".state"

    @property
    def key(self) -> Path:
        """The guide's ``testenv/kata_test_rsa``."""
        return self.root / "kata_test_rsa"

    @property
    def manifest(self) -> Path:
        """What setup built (image paths, accel): read by ``start``."""
        return self.state / "nodes.json"

    @property
    def zipapp(self) -> Path:
        """``katamaran.pyz``: what the guide's step 4 copies to nodes that lack the host root."""
        return self.root / "katamaran.pyz"

    def disk(self, role: str) -> Path:
        """Node's COW overlay."""
        return self.state / f"node-{role}.qcow2"

    def seed(self, role: str) -> Path:
        """Node's cloud-init seed ISO."""
        return self.state / f"node-{role}-seed.iso"

    def serial_log(self, role: str) -> Path:
        """Node's serial console log."""
        return self.state / f"node-{role}-serial.log"

    def pidfile(self, role: str) -> Path:
        """QEMU's -pidfile."""
        return self.state / f"node-{role}.pid"

    def load(self) -> tuple[NodeImage, str]:
        """(image, requested accel) from the manifest; MissingFile if setup never ran."""
        if not self.manifest.is_file():
            raise MissingFile(self.manifest)
        data = json.loads(self.manifest.read_text())
        return image_from_dict(data["image"]), str(data.get("accel", "auto"))

    def spec(self, role: str, accel: str, cpu: str | None = None) -> NodeSpec:
        """The node as the guide runs it; MissingFile for the first missing input."""
        image, _ = self.load()
        for path in (self.disk(role), self.seed(role), self.key, *image.files()):
            if not path.exists():
                raise MissingFile(path)
        qemu = json.loads(self.manifest.read_text()).get("qemu", {})  # setup's node_qemu
        return NodeSpec(
            role=role,
            image=image,
            disk=self.disk(role),
            seed=self.seed(role),
            serial_log=self.serial_log(role),
            ssh_port=TESTENV_SSH_PORTS[role],
            link_port=TESTENV_LINK_PORT,
            accel=accel,
            cpu=cpu,
            qemu=qemu.get("binary", QEMU_BINARY),
            qemu_datadir=qemu.get("datadir", ""),
            pidfile=self.pidfile(role),
        )


# apt package for each host command the nodes need (per image kind)
_HOST_DEPS: dict[str, list[tuple[str, str]]] = {
    "common": [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
    ],
    "debian": [
        ("/usr/sbin/sshd", "openssh-server"),
        ("ssh-keygen", "openssh-client"),
        ("/bin/busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("mkfs.ext4", "e2fsprogs"),
        ("blkid", "util-linux"),
        ("sudo", "sudo"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
    ],
    "ubuntu": [],
}


def missing_packages(kind: str) -> list[str]:
    """apt packages to install before the nodes of this kind can be built and booted."""
    missing: list[str] = []
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    for cmd, pkg in _HOST_DEPS["common"] + _HOST_DEPS[kind]:
        found = Path(cmd).exists() if cmd.startswith("/") else shutil.which(cmd, path=path)
        if not found and pkg not in missing:
            missing.append(pkg)
    return missing


def _resolve_accel(requested: str, progress: Progress) -> tuple[str, str]:
    """(accel, cpu) for ``auto|kvm|tcg`` via the plugin's KVM probe."""
    from pytest_katamaran.qemu.accel import AccelUnavailable, choose_accel

    try:
        accel = choose_accel(requested)
    except AccelUnavailable as e:
        raise NodeBootError(str(e)) from e
    progress(accel.note)
    return accel.name, accel.cpu


def cmd_check_deps(kind: str) -> int:
    """Name the missing apt packages (exit 1) or say all is there."""
    missing = missing_packages(kind)
    if missing:
        print(f"Missing host packages for {kind} nodes: {' '.join(missing)}", file=sys.stderr)
        print(f"Install them with: apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 1
    print(f"==> Host dependencies for {kind} nodes: OK")
    return 0


def cmd_setup(env: Testenv, kind: str, accel: str) -> int:
    """The guide's section 1: image, COW overlays, SSH keypair, seeds; then next steps."""
    from pytest_katamaran.images.seed import write_seed
    from pytest_katamaran.kube.model import build_zipapp
    from pytest_katamaran.ssh import generate_keypair

    def say(msg: str) -> None:
        print(msg, flush=True)

    if missing_packages(kind) and cmd_check_deps(kind):
        return 1
    try:
        import katamaran

        say(f"==> katamaran {getattr(katamaran, '__version__', '?')} importable (Python)")
    except ImportError:
        say("==> WARNING: katamaran is not importable: pip install -e '.[test]'")
    say(f"==> Node image: {kind} (cached under $KATAMARAN_CACHE or ~/.cache/katamaran)")
    t0 = time.monotonic()
    image = build_image(kind, progress=lambda m: say(f"    {m}"))
    say(f"    ready in {time.monotonic() - t0:.1f}s")
    env.state.mkdir(parents=True, exist_ok=True)
    say("==> COW overlays")
    for role in ROLES:
        disk = env.disk(role)
        if disk.exists() and overlay_fits(disk, image):
            say(f"    {_display(disk)} kept (backing {image.disk_base.name})")
        else:
            create_overlay(image, disk)
            say(f"    {_display(disk)} created on {image.disk_base}")
    say("==> SSH keypair")
    existed = env.key.exists()
    generate_keypair(env.key)
    say(f"    {_display(env.key)} {'kept' if existed else 'generated'}")
    pubkey = env.key.with_name(env.key.name + ".pub").read_text().strip()
    say("==> cloud-init seeds")
    for role in ROLES:
        write_seed(
            env.seed(role),
            hostname=f"node-{role}",
            authorized_keys=[pubkey],
            private_ip=f"{PRIVATE_IPS[role]}/{PRIVATE_PREFIX}",
            nic_macs=nic_macs(role),
        )
        say(f"    {_display(env.seed(role))}")
    say("==> katamaran for the nodes (one file; qemu.qmp and pyroute2 inside)")
    build_zipapp(env.zipapp)
    say(f"    {_display(env.zipapp)} (python3 >= 3.10 on the node)")
    say("==> QEMU for the nodes")
    qemu, note = node_qemu(cache_root())
    say(f"    {qemu.version}: {qemu.binary}")
    if note:
        say(f"    WARNING: {note}")
    manifest = {
        "image": image.to_dict(),
        "accel": accel,
        "qemu": {"binary": qemu.binary, "datadir": qemu.datadir, "version": qemu.version},
    }
    env.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    key = _display(env.key)
    say(
        "\nDone. Next steps (two terminals, from the project directory):\n"
        "  ./testenv/start-node-a.sh    # Terminal 1: Node A (source), SSH port 2222\n"
        "  ./testenv/start-node-b.sh    # Terminal 2: Node B (destination), after A listens\n"
        "Then SSH in (password 'ubuntu' if the key fails):\n"
        f"  ssh -o StrictHostKeyChecking=no -i {key} -p 2222 ubuntu@localhost\n"
        f"  ssh -o StrictHostKeyChecking=no -i {key} -p 2223 ubuntu@localhost\n"
        "Copy katamaran to a node that does not see this machine's files (Ubuntu image):\n"
        f"  scp -o StrictHostKeyChecking=no -i {key} -P 2222 {_display(env.zipapp)} "
        "ubuntu@localhost:~/katamaran   # then: sudo ./katamaran -mode ..."
    )
    return 0


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C, so QEMU is always killed on the way out."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _preflight(spec: NodeSpec, progress: Progress, wait_link: float) -> None:
    """Fail early on a busy SSH port; node B waits for node A's link socket."""
    if port_busy(spec.ssh_port):
        raise NodeBootError(
            f"port {spec.ssh_port} is busy (is {spec.name} already running? Stop it with Ctrl-C "
            f"or `python -m pytest_katamaran.qemu.node stop {spec.role}`)"
        )
    if spec.role == "a":
        if port_busy(spec.link_port):
            raise NodeBootError(f"private link port {spec.link_port} is busy")
        return
    if not is_listening(spec.link_port):
        progress(f"==> waiting for node A on the private link 127.0.0.1:{spec.link_port} ...")
        try:
            wait_listening(spec.link_port, wait_link)
        except NodeBootError:
            raise NodeBootError(
                f"node A is not listening on 127.0.0.1:{spec.link_port}: "
                "start ./testenv/start-node-a.sh first"
            ) from None


def smp_note(spec: NodeSpec) -> str | None:
    """A warning for a TCG node with more than one vCPU: the guide's Kata pods would run
    under the node's KVM (TCG's emulated SVM), which corrupted such nodes' memory here
    (NESTED_KVM_NODE_CPUS); ``--cpus 1`` is what the harness boots for that."""
    if spec.accel != "tcg" or spec.vcpus <= NESTED_KVM_NODE_CPUS:
        return None
    return (
        f"note: {spec.name} runs under TCG with {spec.vcpus} vCPUs; a Kata pod under its KVM "
        f"(TCG's emulated SVM) corrupted such nodes' memory here: --cpus "
        f"{NESTED_KVM_NODE_CPUS} for Kata pods (README: Pods under the node's KVM)"
    )


def cmd_start(
    env: Testenv, role: str, foreground: bool, accel: str | None, cpus: int | None = None
) -> int:
    """Boot one node with the guide's ports; foreground: stream its console until it exits.

    ``cpus``: the node's vCPUs (default: the image's)."""
    image, requested = env.load()
    spec = env.spec(role, "tcg")  # validates every input file before probing KVM
    if not is_current(image):
        print(
            "WARNING: the node image predates pytest_katamaran/images/guest/node-*: "
            "re-run ./testenv/setup.sh to boot the current node code",
            file=sys.stderr,
        )
    name, cpu = _resolve_accel(accel or requested, _stderr_progress)
    spec = replace(env.spec(role, name, cpu), smp=cpus)
    note = smp_note(spec)
    if note:
        _stderr_progress(note)
    _preflight(spec, _stderr_progress, wait_link=120.0)
    node = NodeProcess(spec, lambda m: print(m, flush=True))
    hint = (
        f"ssh -o StrictHostKeyChecking=no -i {_display(env.key)} "
        f"-p {spec.ssh_port} ubuntu@localhost"
    )
    if not foreground:
        node.launch()
        node.wait_ready(BOOT_TIMEOUTS[spec.image.kind])
        print(f"==> {spec.name} ready in {node.ready_seconds:.1f}s (PID {node.pid}): {hint}")
        return 0
    with _signals_raise():
        try:
            node.launch()
            print(f"==> serial console ({_display(spec.serial_log)}); Ctrl-C stops the node")
            offset, announced = 0, False
            while True:
                with contextlib.suppress(OSError), spec.serial_log.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                    if chunk:
                        sys.stdout.write(chunk.decode(errors="replace"))
                        sys.stdout.flush()
                if not announced and node.check():
                    announced = True
                    print(f"\n==> {spec.name} ready in {node.ready_seconds:.1f}s: {hint}")
                    sys.stdout.flush()
                if not node.running():
                    rc = node.proc.returncode if node.proc else 1
                    print(f"==> {spec.name}: QEMU exited (rc={rc})")
                    return 0 if rc == 0 else 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            print(f"\n==> stopping {spec.name} (PID {node.pid})")
            return 130
        finally:
            node.kill()


def cmd_stop(env: Testenv, role: str) -> int:
    """Kill a node started by ``start`` (PID from QEMU's pidfile, checked to be ours)."""
    pidfile = env.pidfile(role)
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        print(f"node-{role} is not running")
        return 0
    if str(pidfile).encode() not in cmdline:
        print(f"PID {pid} from {_display(pidfile)} is not node-{role}'s QEMU; not touching it")
        return 1
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    print(f"node-{role} (PID {pid}) stopped")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of vCPUs, 1 or more: {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pytest_katamaran.qemu.node``."""
    parser = argparse.ArgumentParser(prog="python -m pytest_katamaran.qemu.node")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("setup", help="build/cache the node image, overlays, key and seeds")
    p.add_argument("--image", choices=IMAGE_KINDS, default=os.environ.get("KATAMARAN_NODE_IMAGE"))
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    p = sub.add_parser("start", help="boot node a or b with the guide's ports")
    p.add_argument("role", choices=ROLES)
    p.add_argument("--foreground", action="store_true", help="stream the console; Ctrl-C stops")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    p.add_argument("--cpus", type=_positive_int, default=None, help="vCPUs (the image's: 2)")
    p = sub.add_parser("stop", help="stop a node started in the background")
    p.add_argument("role", choices=ROLES)
    p = sub.add_parser("check-deps", help="name missing apt packages")
    p.add_argument("--image", choices=IMAGE_KINDS, default=os.environ.get("KATAMARAN_NODE_IMAGE"))
    args = parser.parse_args(argv)
    env = Testenv.default()
    try:
        if args.cmd == "check-deps":
            return cmd_check_deps(args.image or "debian")
        if args.cmd == "setup":
            return cmd_setup(env, args.image or "debian", args.accel)
        if args.cmd == "start":
            return cmd_start(env, args.role, args.foreground, args.accel, args.cpus)
        return cmd_stop(env, args.role)
    except (MissingFile, NodeImageError, NodeBootError) as e:
        print(str(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
