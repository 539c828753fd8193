"""Decide between KVM and TCG by really running a vCPU, because /dev/kvm existing proves nothing.

On the lab machines /dev/kvm opens, yet QEMU either aborts at vCPU setup
(``failed to set MSR 0x10a``, an assertion in kvm.c), spins without progress, or runs
SeaBIOS fine and then stops the Linux kernel with a KVM internal error. So the probe
boots the nodes' own kernel the way the nodes do.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_katamaran.qemu.process import die_with_parent, start_qemu
from pytest_katamaran.qemu.workload import POD_SMP

QEMU = "qemu-system-x86_64"
KVM_CPU = "host"  # what a KVM node would use; the MSR failure only shows with it
TCG_CPU = "max"
KVM_SMP = 2  # what a node runs (node_vm.RESOURCES); a lone vCPU can pass where two fail
ACCEL_CHOICES = ("auto", "kvm", "tcg")
PROBE_TIMEOUT = 20.0  # the Debian kernel panics for want of a root fs in ~1 s under KVM
# Inside a lab node the probe's boot runs under KVM on TCG's emulated SVM: slower than on
# hardware, and a node that cannot will say so at once (no /dev/kvm), not time out.
NODE_PROBE_TIMEOUT = 90.0
# The KVM module for a CPU flag of /proc/cpuinfo (TCG's `-cpu max` is an AMD CPU with svm).
KVM_MODULES = {"svm": "kvm_amd", "vmx": "kvm_intel"}
# The node kernel's serial console, with no initrd and no root: proof that Linux ran.
KERNEL_RAN = (b"Run /init", b"VFS: Unable to mount root fs", b"Kernel panic")


class AccelUnavailable(RuntimeError):
    """``--accel=kvm`` was requested but KVM cannot run a guest here."""


@dataclass(frozen=True)
class Accel:
    """The accelerator chosen for the nodes and why (shown to the user)."""

    name: str
    reason: str
    cpu: str

    @property
    def fell_back(self) -> bool:
        """True when KVM was wanted (auto) but TCG is used."""
        return self.name == "tcg" and self.reason.startswith("KVM unusable")

    @property
    def note(self) -> str:
        """The line printed to the terminal about this choice."""
        if self.fell_back:
            return f"katamaran: {self.reason}"
        return f"katamaran: using {self.name.upper()} ({self.reason})"

    def qemu_args(self) -> list[str]:
        """``-accel``/``-cpu`` arguments matching the probe (KVM is only proven with this CPU)."""
        return ["-accel", self.name, "-cpu", self.cpu]


def _tail(data: bytes, limit: int = 400) -> str:
    text = data.decode(errors="replace").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    text = " | ".join(lines[-4:])
    return text if len(text) <= limit else "..." + text[-limit:]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL one QEMU by its PID (never by name) and reap it."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def watch_boot(
    argv: list[str], console: Path, markers: tuple[bytes, ...], timeout: float, what: str
) -> tuple[bool, str]:
    """Run argv until console shows one of markers; (ok, reason). The process is killed.

    Not ok on: ``error`` on stderr, an exit before a marker, or timeout (a vCPU that
    spins, or dies in KVM with a register dump, never prints). The stderr tail is
    always part of a failing reason: that is where QEMU puts its KVM error and dump.
    """
    stderr_path = console.with_name(console.name + ".stderr")
    start = time.monotonic()
    # dies with us: a probe QEMU that spins in KVM must not outlive a killed test run
    proc = start_qemu(argv, stderr_path, die_with_parent)
    try:
        while True:
            elapsed = time.monotonic() - start
            rc = proc.poll()
            stderr = stderr_path.read_bytes()
            log = console.read_bytes() if console.exists() else b""
            if any(marker in log for marker in markers):
                return True, f"{what} in {elapsed:.1f}s"
            if b"error" in stderr.lower() or rc is not None:
                how = "QEMU error" if rc is None else f"QEMU exited (rc={rc})"
                return False, f"{how} after {elapsed:.1f}s: {_tail(stderr) or 'no stderr'}"
            if elapsed > timeout:
                seen = "no console output" if not log.strip() else f"console: {_tail(log)}"
                tail = _tail(stderr)
                return False, f"not within {timeout:.0f}s ({seen})" + (f": {tail}" if tail else "")
            time.sleep(0.05)
    finally:
        _kill(proc)


def kvm_kernel_argv(
    qemu: str, kernel: Path, console: Path, cpu: str = KVM_CPU, smp: int = KVM_SMP
) -> list[str]:
    """A node-style boot of kernel under KVM with no initrd: it must end in a root-fs panic."""
    return [
        qemu,
        "-M", "pc",
        "-accel", "kvm",
        "-cpu", cpu,
        "-smp", str(smp),
        "-m", "256",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(kernel),
        "-append", "console=ttyS0,115200 panic=-1",
    ]  # fmt: skip


def node_kernel_image() -> Path:
    """The nodes' Debian kernel (cached by the node image build; else fetched, with progress)."""
    from pytest_katamaran.images.node import fetch_node_kernel

    kernel = fetch_node_kernel()
    return kernel.vmlinux or kernel.vmlinuz  # what node_vm boots (nodeimage.build)


def probe_kvm(
    timeout: float = PROBE_TIMEOUT, *, qemu: str = QEMU, cpu: str = KVM_CPU, smp: int = KVM_SMP
) -> tuple[bool, str]:
    """Boot the nodes' Debian kernel under KVM as the nodes do; returns (usable, reason).

    Why this design: /dev/kvm opening proves nothing here. QEMU has (1) aborted
    while setting up the vCPU, (2) run a vCPU that makes no progress, and (3) run
    SeaBIOS to the end of POST under KVM, yet stopped with a KVM internal error
    (register dump) as soon as the Linux kernel ran, with two vCPUs. Only the
    thing the nodes do proves it: the same kernel, ``-M pc``, ``-cpu``, ``-smp`` (2 for
    nodes; inside a node, the pod's count: :func:`pod_accel`).
    With no initrd the kernel prints its way to ``VFS: Unable to mount root fs`` /
    ``Kernel panic`` on ttyS0 within about a second; that text must appear before
    ``timeout``. (A SeaBIOS-only check adds nothing: the kernel boot runs SeaBIOS.)

    The kernel is the one the node image build caches (``nodeimage.fetch_node_kernel``);
    QEMU is always killed by its PID. Cached: one probe per process/session.
    """
    return _probe_kvm(float(timeout), qemu, cpu, smp)


@functools.cache  # keyed on normalized arguments: probe_kvm() and probe_kvm(20.0) share it
def _probe_kvm(timeout: float, qemu: str, cpu: str, smp: int) -> tuple[bool, str]:
    binary = shutil.which(qemu)
    if binary is None:
        return False, f"{qemu} not found on PATH"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror or exc}"
    os.close(fd)
    try:
        kernel = node_kernel_image()
    except (RuntimeError, OSError) as exc:  # NodeImageError: no apt metadata, no download
        return False, f"KVM unproven: no Debian node kernel to boot ({exc})"
    with tempfile.TemporaryDirectory(prefix="katamaran-kvm-probe-") as tmp:
        console = Path(tmp) / "serial.log"
        argv = kvm_kernel_argv(binary, kernel, console, cpu, smp)
        ok, how = watch_boot(
            argv, console, KERNEL_RAN, timeout, f"Debian kernel booted under KVM (-cpu {cpu})"
        )
    if ok:
        return True, how
    return False, f"the Debian kernel did not boot under KVM (-cpu {cpu}, -smp {smp}): {how}"


def choose_accel(
    requested: str = "auto", *, timeout: float = PROBE_TIMEOUT, smp: int = KVM_SMP
) -> Accel:
    """Resolve ``--accel``: auto prefers KVM when the probe proves it works, else TCG.

    An explicit ``kvm`` that does not work raises :class:`AccelUnavailable`
    rather than silently running 20x slower. ``smp``: the vCPUs of the guests to come.
    """
    if requested not in ACCEL_CHOICES:
        raise ValueError(f"accel must be one of {', '.join(ACCEL_CHOICES)}; got {requested!r}")
    if requested == "tcg":
        return Accel("tcg", "requested with --accel=tcg", TCG_CPU)
    ok, reason = probe_kvm(timeout, smp=smp)
    if ok:
        return Accel("kvm", reason, KVM_CPU)
    if requested == "kvm":
        raise AccelUnavailable(
            f"--accel=kvm was requested but KVM is unusable: {reason.rstrip('.')}. "
            "Use --accel=tcg (or auto) on this machine."
        )
    return Accel("tcg", f"KVM unusable ({reason}); using TCG", TCG_CPU)


def kvm_module(cpuinfo: str) -> str | None:
    """The KVM module this CPU can use (``kvm_amd``/``kvm_intel``), from /proc/cpuinfo's flags."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return next((mod for flag, mod in KVM_MODULES.items() if flag in flags), None)
    return None


def load_kvm(cpuinfo: Path = Path("/proc/cpuinfo"), dev: Path = Path("/dev/kvm")) -> str:
    """Make /dev/kvm appear if this CPU offers virtualization (root; modprobe).

    Why: a lab node under TCG runs `-cpu max`, an AMD CPU with SVM that TCG emulates, so
    KVM works inside the node although the host has none; its kernel just does not load
    kvm_amd by itself.  Returns what happened, for the accelerator's reason.
    """
    if dev.exists():
        return f"{dev} present"
    module = kvm_module(cpuinfo.read_text())
    if module is None:
        return "the CPU offers neither svm nor vmx"
    done = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"modprobe {module} failed: {(done.stderr or done.stdout).strip()}"
    return f"modprobe {module}"


def pod_accel(
    requested: str = "auto", *, timeout: float = NODE_PROBE_TIMEOUT, smp: int = POD_SMP
) -> Accel:
    """The accelerator for a pod's QEMU on this (lab) node: KVM when it really runs a vCPU.

    Why: under TCG a pod guest is translated twice (by the pod's TCG, then the node's);
    on TCG's emulated SVM it runs under the node's KVM and only the node translates it.
    Measured in a TCG lab node (2026-12-03): the test guest ready after 4.0 s of guest
    uptime instead of 97.5 s, and the two-node e2e at the guide's 10 ms lost 0 of 10692
    and 0 of 13318 pings, first reply 0.09-0.24 s after RESUME (20-40 s under TCG).
    The harness's default (``--pod-accel=auto``) since TCG's SVM was found to corrupt a
    two-vCPU node's memory (resets, hangs, a "corrupted stack end" panic within 5-60
    nested boots) and to run clean in a one-vCPU node (95 boots): such nodes get one vCPU
    (``qemu.node.node_cpus``).
    Same rules as :func:`choose_accel`; the probe is the same real boot (17-32 s here),
    with the pod's vCPUs (``smp``, Kata's one by default): the 95 clean boots were of
    one-vCPU guests, and a probe's second vCPU would be the one thing the pods never run.
    """
    if requested not in ACCEL_CHOICES or requested == "tcg":
        return choose_accel(requested)  # TCG, or its ValueError: no modprobe for either
    loaded = load_kvm()
    try:
        chosen = choose_accel(requested, timeout=timeout, smp=smp)
    except AccelUnavailable as err:
        raise AccelUnavailable(f"{err} ({loaded})") from None
    if chosen.name == "kvm":
        return Accel("kvm", f"{chosen.reason}; {loaded}", KVM_CPU)
    return chosen
