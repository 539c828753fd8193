"""Run one workload VM the way Kata lays it out, and find QMP sockets like the tool does.

Why: the harness needs a real QEMU it can boot, migrate and kill deterministically
(by PID, never by name), inside a chosen netns, with a serial log to prove the guest
came up.  Callers must stop it in `finally` (or use `with Sandbox() as sb:`) so a
KeyboardInterrupt or a failing assertion never leaks a QEMU process or its run dir.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_katamaran.logtail import tail
from pytest_katamaran.net.hostlab import netns_preexec, open_netns
from pytest_katamaran.qemu.process import die_with_parent as kill_with_parent
from pytest_katamaran.qemu.process import start_qemu
from pytest_katamaran.qemu.workload import (
    CONSOLE_LOG,
    DEFAULT_RUN_DIR,
    EXTRA_MONITOR_SOCKET,
    PIDFILE,
    QMP_SOCKET,
    SandboxSpec,
    sandbox_argv,
)

READY_MARKER = "KATAMARAN-GUEST-READY"
QEMU_STDERR = "qemu.stderr"


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


class Sandbox:
    """One QEMU process for a SandboxSpec.

    `start()` returns once the QMP socket exists; `wait_ready()` once the guest printed
    READY on ttyS0 (`boot_time` = start -> READY, seconds).  `stop()` is idempotent.
    """

    def __init__(self) -> None:
        self.spec: SandboxSpec | None = None
        self.argv: list[str] = []
        self.netns: str | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.qmp_ready_at: float | None = None
        self.boot_time: float | None = None
        self.console_tail: str = ""
        self.stderr_tail: str = ""
        self._created_dir = False

    # -- properties -----------------------------------------------------------------

    def _need_spec(self) -> SandboxSpec:
        if self.spec is None:
            raise RuntimeError("sandbox not started")
        return self.spec

    @property
    def pid(self) -> int | None:
        """QEMU's PID (the Popen child itself: no wrapper process in between)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def qmp_path(self) -> Path:
        """The QMP socket a client should use (extra monitor when configured)."""
        return self._need_spec().monitor_path

    @property
    def console_log(self) -> Path:
        """The serial console file (ttyS0)."""
        return self._need_spec().console_log

    @property
    def run_dir(self) -> Path:
        """This sandbox's `<run_dir>/<id>` directory (removed by stop)."""
        return self._need_spec().sandbox_dir

    def alive(self) -> bool:
        """True while the QEMU process has not exited."""
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------

    def start(
        self,
        spec: SandboxSpec,
        netns: str | None = None,
        timeout: float = 30.0,
        *,
        die_with_parent: bool = True,
    ) -> Sandbox:
        """Launch QEMU (inside `netns` when given) and wait for its QMP socket.

        `die_with_parent` sets PR_SET_PDEATHSIG so a SIGKILLed test run cannot leave
        an orphan VM; turn it off when the VM must outlive its launcher.  Note the
        kernel ties it to the launching *thread*: start from a long-lived thread.
        """
        if self.proc is not None:
            raise RuntimeError("sandbox already started")
        self.spec = spec
        self.netns = netns
        self.argv = sandbox_argv(spec)
        sdir = spec.sandbox_dir
        if sdir.exists() and any(sdir.iterdir()):
            raise FileExistsError(f"sandbox run dir {sdir} exists and is not empty")
        nsfd = open_netns(netns) if netns is not None else None
        enter_ns = netns_preexec(nsfd) if nsfd is not None else None

        def _preexec() -> None:
            if enter_ns is not None:
                enter_ns()
            if die_with_parent:
                kill_with_parent()

        try:
            sdir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
            self.started_at = time.monotonic()
            # own session: Ctrl-C reaches pytest, which calls stop()
            self.proc = start_qemu(self.argv, sdir / QEMU_STDERR, _preexec)
        except BaseException:
            self.stop()
            raise
        finally:
            if nsfd is not None:
                os.close(nsfd)
        try:
            self._wait_for(lambda: _is_socket(spec.monitor_path), timeout, "QMP socket")
        except BaseException:
            self.stop()
            raise
        self.qmp_ready_at = time.monotonic()
        return self

    def _describe(self) -> str:
        spec = self._need_spec()
        return (
            f"\n--- QEMU argv ---\n{shlex.join(self.argv)}"
            f"\n--- QEMU stderr ---\n{tail(spec.sandbox_dir / QEMU_STDERR, 30)}"
            f"\n--- serial log tail ({spec.console_log}) ---\n{tail(spec.console_log, 60)}"
        )

    def _wait_for(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if cond():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"QEMU exited with {self.proc.returncode} before {what}" + self._describe()
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f}s" + self._describe())
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 60.0, marker: str = READY_MARKER) -> float:
        """Wait for `marker` on the serial console; returns and records `boot_time`."""
        spec = self._need_spec()
        pos = 0
        buf = b""
        needle = marker.encode()

        def _seen() -> bool:
            nonlocal pos, buf
            try:
                with open(spec.console_log, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                return False
            pos += len(chunk)
            buf = (buf + chunk)[-(len(needle) + 65536) :]
            return needle in buf

        self._wait_for(_seen, timeout, f"{marker!r} on the serial console")
        assert self.started_at is not None
        self.boot_time = time.monotonic() - self.started_at
        return self.boot_time

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` s, reap, and remove the run dir. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        if self._created_dir and self.spec is not None:
            sdir = self.spec.sandbox_dir
            self.console_tail = tail(sdir / CONSOLE_LOG, 60)
            self.stderr_tail = tail(sdir / QEMU_STDERR, 30)
            shutil.rmtree(sdir, ignore_errors=True)
            self._created_dir = False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SandboxSockets:
    """What lives under `/run/vc/vm/<id>/` for one sandbox."""

    id: str
    qmp: Path | None
    extra_monitor: Path | None
    pidfile: Path | None

    @property
    def preferred(self) -> Path | None:
        """The socket to use: with real Kata the primary qmp.sock is held by the shim."""
        return self.extra_monitor or self.qmp

    def read_pid(self) -> int | None:
        """QEMU's PID from the pidfile, if present and parseable."""
        if self.pidfile is None:
            return None
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None


def discover_qmp_sockets(run_dir: Path = DEFAULT_RUN_DIR) -> list[SandboxSockets]:
    """List sandboxes under `run_dir` that have a QMP or extra-monitor socket, by id."""
    found: list[SandboxSockets] = []
    try:
        entries = sorted(Path(run_dir).iterdir())
    except FileNotFoundError:
        return found
    for d in entries:
        if not d.is_dir():
            continue
        qmp = d / QMP_SOCKET
        extra = d / EXTRA_MONITOR_SOCKET
        pidfile = d / PIDFILE
        sockets = SandboxSockets(
            id=d.name,
            qmp=qmp if _is_socket(qmp) else None,
            extra_monitor=extra if _is_socket(extra) else None,
            pidfile=pidfile if pidfile.is_file() else None,
        )
        if sockets.preferred is not None:
            found.append(sockets)
    return found
