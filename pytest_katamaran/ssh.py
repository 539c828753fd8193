"""A thin paramiko wrapper: the harness drives each node over SSH like the manual guide does.

Only what the tests need: wait for sshd, run commands with a clear failure, copy
files over SFTP, and run long-lived commands (ping, katamaran dest mode) in the
background with a PID we can signal.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal as _signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import paramiko

log = logging.getLogger(__name__)

_POLL = 0.01
_TAIL_CHARS = 2000


@dataclass(frozen=True)
class Result:
    """Outcome of one remote command."""

    rc: int
    stdout: str
    stderr: str
    cmd: str

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.rc == 0


class CommandFailed(Exception):
    """A remote command exited non-zero; the message carries what is needed to debug it."""

    def __init__(self, result: Result, host: str = "") -> None:
        super().__init__(result)
        self.result = result
        self.host = host

    def __str__(self) -> str:
        where = f" on {self.host}" if self.host else ""
        tail = _tail(self.result.stderr) or _tail(self.result.stdout) or "(no output)"
        return f"command failed{where} (rc={self.result.rc}): {self.result.cmd}\n{tail}"


class CommandTimeout(TimeoutError):
    """A remote command did not finish in time."""


def _tail(text: str, limit: int = _TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _describe_error(exc: BaseException | None) -> str:
    """Readable error text; paramiko hides 'connection refused' inside NoValidConnectionsError."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        inner = "; ".join(f"{e.strerror or e}" for e in exc.errors.values())
        return f"cannot connect ({inner})"
    return f"{type(exc).__name__}: {exc}"


def _with_env(cmd: str, env: Mapping[str, str] | None) -> str:
    """Prefix exports: sshd usually rejects SSH env requests (AcceptEnv), a shell never does."""
    if not env:
        return cmd
    exports = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
    return f"export {exports}; {cmd}"


def _drain(chan: paramiko.Channel, out: bytearray, err: bytearray, deadline: float | None) -> bool:
    """Read stdout and stderr together (so neither pipe can block the other) until EOF.

    Returns False if ``deadline`` passed first.
    """
    while True:
        busy = False
        while chan.recv_ready():
            out += chan.recv(65536)
            busy = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
            busy = True
        if chan.closed or (chan.eof_received and chan.exit_status_ready()):
            if not chan.recv_ready() and not chan.recv_stderr_ready():
                return True
            continue
        if deadline is not None and time.monotonic() > deadline:
            return False
        if not busy:
            time.sleep(_POLL)


class SSHClient:
    """One node's SSH connection (lazily connected, reconnected if the transport died)."""

    def __init__(
        self,
        host: str,
        port: int = 22,
        user: str = "root",
        key_path: Path | str | None = None,
        connect_timeout: float = 10.0,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_path = Path(key_path) if key_path is not None else None
        self.connect_timeout = connect_timeout
        self.name = name or f"{user}@{host}:{port}"
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._procs: list[RemoteProcess] = []

    def __repr__(self) -> str:
        return f"SSHClient({self.name})"

    @property
    def address(self) -> str:
        """``user@host:port`` for messages."""
        return f"{self.user}@{self.host}:{self.port}"

    def ssh_command(self) -> str:
        """The OpenSSH command line a human can paste to reach this node."""
        parts = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        if self.key_path is not None:
            parts += ["-i", str(self.key_path)]
        parts += ["-p", str(self.port), f"{self.user}@{self.host}"]
        return shlex.join(parts)

    # ------------------------------------------------------------------ connection

    def connect(self) -> paramiko.SSHClient:
        """Return a live paramiko client, connecting if needed."""
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if client is not None and transport is not None and transport.is_active():
                return client
            if client is not None:
                client.close()
            client = paramiko.SSHClient()
            # Lab VMs get fresh host keys on every boot: pinning them would only break reruns.
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            pkey = paramiko.PKey.from_path(self.key_path) if self.key_path is not None else None
            try:
                client.connect(
                    self.host,
                    port=self.port,
                    username=self.user,
                    pkey=pkey,
                    timeout=self.connect_timeout,
                    banner_timeout=self.connect_timeout,
                    auth_timeout=self.connect_timeout,
                    allow_agent=False,
                    look_for_keys=False,
                )
            except BaseException:
                client.close()
                raise
            transport = client.get_transport()
            if transport is not None:
                transport.set_keepalive(5)
            self._client = client
            return client

    def wait_ready(self, timeout: float = 300.0, interval: float = 1.0) -> None:
        """Retry until sshd accepts us and runs a command (TCP accept alone is not enough)."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        attempts = 0
        while True:
            attempts += 1
            try:
                self.connect()
                self.run("true", timeout=max(5.0, self.connect_timeout))
                return
            except (OSError, EOFError, paramiko.SSHException, CommandFailed) as exc:
                last = exc
                self._drop()
            if time.monotonic() + interval > deadline:
                raise TimeoutError(
                    f"SSH to {self.address} not ready after {timeout:g}s "
                    f"({attempts} attempts); last error: {_describe_error(last)}"
                ) from last
            time.sleep(interval)

    def _drop(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _open_channel(self, cmd: str) -> paramiko.Channel:
        transport = self.connect().get_transport()
        if transport is None:
            raise paramiko.SSHException(f"{self.address}: no transport")
        chan = transport.open_session(timeout=self.connect_timeout)
        chan.exec_command(cmd)
        chan.shutdown_write()  # no stdin: commands must not wait for input
        return chan

    def close(self) -> None:
        """Stop background commands we started, then close the connection."""
        for proc in list(self._procs):
            try:
                proc.stop(timeout=5.0)
            except Exception as exc:  # closing must not mask the real failure
                log.warning("%s: could not stop %s: %s", self.name, proc.cmd, exc)
        self._procs.clear()
        self._drop()

    def __enter__(self) -> SSHClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ commands

    def _wrap(self, cmd: str, *, sudo: bool, env: Mapping[str, str] | None) -> str:
        cmd = _with_env(cmd, env)
        if sudo and self.user != "root":
            return f"sudo -n sh -c {shlex.quote(cmd)}"
        return cmd

    def run(
        self,
        cmd: str,
        *,
        timeout: float | None = 120.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        sudo: bool = False,
    ) -> Result:
        """Run ``cmd`` through the remote shell and wait for it.

        On timeout the channel is closed and :class:`CommandTimeout` raised (the
        remote process may linger: without a pty sshd does not kill it).
        """
        full = self._wrap(cmd, sudo=sudo, env=env)
        chan = self._open_channel(full)
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            finished = _drain(chan, out, err, deadline)
            if not finished:
                raise CommandTimeout(
                    f"command timed out after {timeout:.0f}s on {self.address}: {cmd}\n"
                    f"stdout tail: {_tail(out.decode(errors='replace'), 500)}\n"
                    f"stderr tail: {_tail(err.decode(errors='replace'), 500)}"
                )
            rc = chan.recv_exit_status()
        finally:
            chan.close()
        result = Result(rc, out.decode(errors="replace"), err.decode(errors="replace"), cmd)
        if check and rc != 0:
            raise CommandFailed(result, self.address)
        return result

    def sudo(
        self,
        cmd: str,
        *,
        timeout: float | None = 120.0,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """:meth:`run` as root (``sudo -n`` so a password prompt fails instead of hanging)."""
        return self.run(cmd, timeout=timeout, check=check, env=env, sudo=True)

    def start(
        self, cmd: str, *, sudo: bool = False, env: Mapping[str, str] | None = None
    ) -> RemoteProcess:
        """Start one simple command in the background and return a handle to it.

        The shell prints its PID and then ``exec``s the command, so the PID we later
        ``kill`` is the command itself.  ``cmd`` must therefore be a single command
        (wrap pipelines in ``sh -c`` yourself).
        """
        inner = _with_env(f"echo $$; exec {cmd}", env)
        full = f"sudo -n sh -c {shlex.quote(inner)}" if sudo and self.user != "root" else inner
        chan = self._open_channel(full)
        proc = RemoteProcess(self, chan, cmd, sudo=sudo)
        self._procs.append(proc)
        try:
            proc.wait_pid(timeout=max(10.0, self.connect_timeout))
        except BaseException:
            proc.close()
            raise
        return proc

    # ------------------------------------------------------------------ files

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a local file to the node (SFTP), keeping its permission bits."""
        local = Path(local)
        with self.connect().open_sftp() as sftp:
            sftp.put(str(local), remote)
            sftp.chmod(remote, local.stat().st_mode & 0o7777)

    def get(self, remote: str, local: Path | str) -> None:
        """Copy a file from the node (SFTP)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        with self.connect().open_sftp() as sftp:
            sftp.get(remote, str(local))


class RemoteProcess:
    """A background command on a node; output is drained continuously so it never blocks."""

    def __init__(self, client: SSHClient, chan: paramiko.Channel, cmd: str, *, sudo: bool) -> None:
        self.client = client
        self.chan = chan
        self.cmd = cmd
        self.sudo = sudo
        self.pid: int | None = None
        self._out = bytearray()
        self._err = bytearray()
        self._buf_lock = threading.Lock()
        self._pid_event = threading.Event()
        self._done = threading.Event()
        self.returncode: int | None = None
        self._reader = threading.Thread(
            target=self._read, name=f"ssh-reader {client.name}: {cmd[:40]}", daemon=True
        )
        self._reader.start()

    def __repr__(self) -> str:
        return f"RemoteProcess({self.client.name}, pid={self.pid}, {self.cmd!r})"

    def _read(self) -> None:
        chan = self.chan
        try:
            while True:
                busy = False
                if chan.recv_ready():
                    data = chan.recv(65536)
                    busy = True
                    with self._buf_lock:
                        self._out += data
                        if self.pid is None and b"\n" in self._out:
                            first, _, rest = bytes(self._out).partition(b"\n")
                            try:
                                self.pid = int(first.strip())
                            except ValueError:
                                self.pid = -1
                            self._out = bytearray(rest)
                            self._pid_event.set()
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    busy = True
                    with self._buf_lock:
                        self._err += data
                if chan.closed or (chan.eof_received and chan.exit_status_ready()):
                    if not chan.recv_ready() and not chan.recv_stderr_ready():
                        break
                    continue
                if not busy:
                    time.sleep(_POLL)
            # Killed by a signal, sshd sends exit-signal (not exit-status): returncode stays None.
            if chan.exit_status_ready() and chan.exit_status != -1:
                self.returncode = chan.exit_status
        except Exception as exc:  # connection died: record it, do not kill the thread noisily
            with self._buf_lock:
                self._err += f"\n[katamaran: reader stopped: {exc}]".encode()
        finally:
            self._done.set()
            self._pid_event.set()

    def wait_pid(self, timeout: float) -> int:
        """Block until the shell reported the PID (or the command died)."""
        if not self._pid_event.wait(timeout) or self.pid is None or self.pid < 0:
            raise RuntimeError(
                f"{self.client.address}: could not start `{self.cmd}`: "
                f"stderr: {_tail(self.errors(), 500)!r}"
            )
        return self.pid

    def output(self) -> str:
        """Stdout so far (without the PID line)."""
        with self._buf_lock:
            return self._out.decode(errors="replace")

    def errors(self) -> str:
        """Stderr so far."""
        with self._buf_lock:
            return self._err.decode(errors="replace")

    def is_running(self) -> bool:
        """Whether the remote command has not exited (as far as SSH tells us)."""
        return not self._done.is_set()

    def signal(self, sig: int) -> None:
        """``kill -SIG pid`` through a separate channel (as root if started with sudo)."""
        if self.pid is None or self.pid < 0 or not self.is_running():
            return
        num = int(sig)
        self.client.run(f"kill -{num} {self.pid}", sudo=self.sudo, check=False, timeout=30.0)

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code once the command ended, or None while it still runs."""
        if not self._done.wait(timeout):
            return None
        self._reader.join(timeout=1.0)
        return self.returncode

    def stop(self, sig: int = _signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal, wait, escalate to SIGKILL; returns the exit code if known."""
        if self.is_running():
            self.signal(sig)
            if self.wait(timeout) is None:
                self.signal(_signal.SIGKILL)
                self.wait(5.0)
        self.close()
        return self.returncode

    def close(self) -> None:
        """Forget the channel (after the command ended or was abandoned)."""
        try:
            self.chan.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        if self in self.client._procs:
            self.client._procs.remove(self)


def generate_keypair(path: Path | str, *, bits: int = 3072, overwrite: bool = False) -> Path:
    """Write an RSA private key (mode 0600) and ``path.pub`` in OpenSSH format.

    Done with paramiko so hosts without ssh-keygen work.  An existing key is kept
    (like the guide's setup.sh) unless ``overwrite``; its .pub is regenerated.
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        key: paramiko.PKey = paramiko.RSAKey.from_private_key_file(str(path))
    else:
        key = paramiko.RSAKey.generate(bits)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            key.write_private_key(fh)
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    pub.write_text(f"{key.get_name()} {key.get_base64()} katamaran-test\n")
    return path
