"""Decide between KVM and TCG by really running a vCPU, because /dev/kvm existing proves nothing.

On the lab machines /dev/kvm opens, yet QEMU either aborts at vCPU setup
(``failed to set MSR 0x10a``, an assertion in kvm.c) or spins without progress.
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

QEMU = "qemu-system-x86_64"
KVM_CPU = "host"  # what a KVM node would use; the MSR failure only shows with it
TCG_CPU = "max"
ACCEL_CHOICES = ("auto", "kvm", "tcg")
# SeaBIOS prints these to the debug console once POST is complete (no disk attached).
_POST_DONE = (b"Booting from ", b"No bootable device")


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


@functools.cache
def probe_kvm(timeout: float = 10.0, *, qemu: str = QEMU, cpu: str = KVM_CPU) -> tuple[bool, str]:
    """Boot SeaBIOS under KVM and watch it finish POST; returns (usable, reason).

    Why this design: the failure modes seen here are (1) QEMU aborting while
    setting up the vCPU and (2) a vCPU that runs but makes no progress.  "Still
    running after N seconds" cannot tell (2) from success, so the probe needs a
    positive sign that guest code executed: SeaBIOS writes its log to the
    ``isa-debugcon`` port 0x402, and with no disk attached POST ends by printing
    ``Booting from ...`` / ``No bootable device``.  That needs the vCPU to run
    real and protected mode code, take interrupts and do port and MMIO I/O.

    Verdict: usable only if that text appears before ``timeout`` and QEMU wrote
    no ``error`` on stderr; an early exit is reported with its stderr tail, a
    timeout as a hung vCPU.  The QEMU process is always killed by its PID.
    ``-cpu host`` is used because it is what a KVM node runs (and it is the
    model that trips the MSR failure).  Cached: one probe per process/session.
    """
    binary = shutil.which(qemu)
    if binary is None:
        return False, f"{qemu} not found on PATH"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror or exc}"
    os.close(fd)

    with tempfile.TemporaryDirectory(prefix="katamaran-kvm-probe-") as tmp:
        debug_log = Path(tmp) / "seabios.log"
        stderr_path = Path(tmp) / "stderr"
        argv = [
            binary,
            "-accel", "kvm",
            "-cpu", cpu,
            "-M", "pc",
            "-m", "32",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-no-reboot",
            "-chardev", f"file,id=dbg,path={debug_log}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
        ]  # fmt: skip
        start = time.monotonic()
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        try:
            while True:
                elapsed = time.monotonic() - start
                rc = proc.poll()
                stderr = stderr_path.read_bytes()
                log = debug_log.read_bytes() if debug_log.exists() else b""
                if b"error" in stderr.lower():
                    return False, f"QEMU error with -cpu {cpu}: {_tail(stderr)}"
                if any(marker in log for marker in _POST_DONE):
                    return True, f"SeaBIOS POST completed under KVM (-cpu {cpu}) in {elapsed:.1f}s"
                if rc is not None:
                    return False, (
                        f"QEMU exited (rc={rc}) after {elapsed:.1f}s with -cpu {cpu}: "
                        f"{_tail(stderr) or 'no stderr'}"
                    )
                if elapsed > timeout:
                    progress = "no firmware output" if not log else "firmware never finished POST"
                    return False, (
                        f"vCPU made no progress in {timeout:.0f}s ({progress}) with -cpu {cpu}"
                    )
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def choose_accel(requested: str = "auto", *, timeout: float = 10.0) -> Accel:
    """Resolve ``--accel``: auto prefers KVM when the probe proves it works, else TCG.

    An explicit ``kvm`` that does not work raises :class:`AccelUnavailable`
    rather than silently running 20x slower.
    """
    if requested not in ACCEL_CHOICES:
        raise ValueError(f"accel must be one of {', '.join(ACCEL_CHOICES)}; got {requested!r}")
    if requested == "tcg":
        return Accel("tcg", "requested with --accel=tcg", TCG_CPU)
    ok, reason = probe_kvm(timeout)
    if ok:
        return Accel("kvm", reason, KVM_CPU)
    if requested == "kvm":
        raise AccelUnavailable(
            f"--accel=kvm was requested but KVM is unusable: {reason.rstrip('.')}. "
            "Use --accel=tcg (or auto) on this machine."
        )
    return Accel("tcg", f"KVM unusable ({reason}); using TCG", TCG_CPU)
