"""Plugin tests: pytest inside pytest (pytester), plus an in-process SSH server for ssh.py.

The plugin itself is loaded through its ``pytest11`` entry point, in the outer
session and in every pytester run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import paramiko
import pytest

from pytest_katamaran.ssh import generate_keypair

pytest_plugins = ["pytester"]


# A fake backend for pytester runs: nodes whose "ssh" runs commands on this host.
# It records what the plugin asked of it in events.log next to the conftest.
FAKE_BACKEND_CONFTEST = """
import os
from pathlib import Path

import pytest_katamaran.backend as backend_mod
from pytest_katamaran.checks.ping import LocalRunner

EVENTS = Path(__file__).with_name("events.log")


def event(msg):
    with EVENTS.open("a") as fh:
        fh.write(msg + "\\n")


class FakeSSH(LocalRunner):
    host = "127.0.0.1"
    user = "root"

    def __init__(self, port):
        super().__init__()
        self.port = port

    def ssh_command(self):
        return f"ssh -p {self.port} root@127.0.0.1"


class FakeNode:
    def __init__(self, name, ip, port, log):
        self.name, self.private_ip, self.ssh_port, self.serial_log = name, ip, port, log
        self.ssh = FakeSSH(port)


class FakeNodes:
    def __init__(self, config):
        here = Path(__file__).parent
        self.node_a = FakeNode("node-a", "10.0.0.1", 2222, here / "node-a.serial.log")
        self.node_b = FakeNode("node-b", "10.0.0.2", 2223, here / "node-b.serial.log")
        event(f"init accel={config.accelerator.name} image={config.node_image}")

    def start(self):
        for n in (self.node_a, self.node_b):
            n.serial_log.write_text("".join(f"{n.name} console line {i}\\n" for i in range(100)))
        event("start")
        if os.environ.get("FAKE_START_FAIL"):
            raise RuntimeError("fake boot failed")

    def stop(self):
        event("stop")

    def serial_logs(self):
        return {n.name: n.serial_log for n in (self.node_a, self.node_b)}


def fake_get_backend(name, config):
    assert name == "qemu", name
    return FakeNodes(config)


backend_mod.get_backend = fake_get_backend
"""


# A fake node agent on top of the fake backend: `nodeside` steps are answered with the
# JSON the real agent prints (and recorded in events.log); `katamaran` runs as a local
# shell script printing katamaran's stamped lines; any other command runs on this host.
# guest_image/workload_qemu are overridden so no guest is built.  What it proves: the
# fixtures' wiring (which steps, which flags, cleanup on every path), not the flow itself
# (tests/e2e does that on real nodes).
FAKE_AGENT_CONFTEST = """
import json, os, shlex, subprocess, time
from types import SimpleNamespace

import pytest
from pytest_katamaran.checks.ping import LocalProcess
from pytest_katamaran.ssh import Result


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("guest")
    return SimpleNamespace(kernel=d / "vmlinuz", initrd=d / "initrd.gz")


@pytest.fixture(scope="session")
def accelerator():
    # TCG, as the auto probe finds on a machine without usable KVM, but without its 20 s
    # probe boot in every run (a KVM vCPU spinning in the kernel: a whole core, under the
    # suite's other QEMUs); the probe and its note have their own tests.
    from pytest_katamaran.qemu.accel import Accel

    return Accel("tcg", "forced by the fake agent", "max")


@pytest.fixture(scope="session")
def workload_qemu():
    return SimpleNamespace(version="fake", nodeside_args=lambda: ["--qemu-binary", "qemu"])


def answer(node, step, args):
    fail = os.environ.get("FAKE_FAIL_STEP")
    if fail == step:
        return {"ok": False, "error": f"fake {step} failure"}
    which = args[args.index("--which") + 1] if "--which" in args else None
    if step == "workload-start":
        return {"ok": True, "qmp": "/run/vc/vm/kmre2e/qmp.sock", "boot_time_s": 1.5,
                "spec": {"drive_id": "drive-virtio-disk0", "disk": args[args.index("--disk") + 1]},
                "argv": ["qemu", "-drive", "file=" + args[args.index("--disk") + 1]]}
    if step == "dest-start":
        disk = args[args.index("--disk") + 1]
        return {"ok": True, "qmp": "/run/vc/vm/kmre2e/qmp-dest.sock", "status": "inmigrate",
                "argv": ["qemu", "-drive", "file=" + disk, "-incoming", "defer"]}
    if step == "converge":
        return {"ok": True, "at": time.time()}
    if step == "status":
        return {"ok": True, "source": {"qmp_status": "postmigrate"},
                "dest": {"qmp_status": "running"}}
    if step == "vm-stop":
        return {"ok": True, "last_ack": 20 if which == "dest" else 10}
    if step == "console":
        return {"ok": True, "last_ack": 7, "tail": f"{which} console of {node}"}
    if step == "diskcheck":
        return {"ok": True, "report": "disk check OK: fake"}
    if step == "nbd-attach":
        return {"ok": True, "device": "/dev/nbd0"}
    return {"ok": True}


def agent_sudo(self, cmd, timeout=None, check=True):
    argv = shlex.split(cmd)
    if argv[:3] == ["ip", "route", "replace"]:  # the CNI's step (NodeSide.route_now)
        event(f"{self.node_name}: {cmd}")
        return Result(0, f"{time.time()}\\n", "", cmd)
    if "pytest_katamaran.agent.node" not in argv:
        done = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        return Result(done.returncode, done.stdout, done.stderr, cmd)
    rest = argv[argv.index("--state-dir") + 2:]
    event(f"{self.node_name}: nodeside {' '.join(rest)}")
    data = answer(self.node_name, rest[0], rest[1:])
    return Result(0 if data["ok"] else 1, json.dumps(data) + "\\n", "fake stderr", cmd)


SCRIPTS = {
    "dest": ["destination ready", "@sleep 1", "migration received in 1.0 s", "VM resumed",
             "plug released 12 packets"],
    "source": ["switchover (tunnel)", "VM paused",
               "migration completed in 1.2 s (downtime 30 ms, RAM 10.0 MiB, storage 64.0 MiB)",
               "holding tunnel 30 s"],
}


def agent_start(self, cmd, *, sudo=False):
    argv = shlex.split(cmd)
    if "pytest_katamaran.agent.node" not in argv:
        return FakeSSH._local_start(self, cmd, sudo=sudo)
    flags = argv[argv.index("--") + 1:]
    event(f"{self.node_name}: katamaran {' '.join(flags)}")
    mode = flags[flags.index("-mode") + 1]
    lines = []
    for line in SCRIPTS[mode]:
        if line.startswith("@"):
            lines.append(line[1:])
        else:
            lines.append(f'echo "[$(date +%s.%N)] {line}" >&2')
    if os.environ.get("FAKE_KATAMARAN_FAIL") == mode:
        lines.append('echo "ERROR: fake katamaran failure" >&2; exit 1')
    return LocalProcess(["sh", "-c", "; ".join(lines)])


FakeSSH._local_start = FakeSSH.start
FakeSSH.sudo = agent_sudo
FakeSSH.run = agent_sudo
FakeSSH.start = agent_start
_orig_init = FakeNode.__init__


def _node_init(self, name, ip, port, log):
    _orig_init(self, name, ip, port, log)
    self.ssh.node_name = name


FakeNode.__init__ = _node_init
"""


@pytest.fixture
def fake_agent(pytester: pytest.Pytester) -> Path:
    """The fake backend plus the fake node agent; returns the events log path."""
    pytester.makeconftest(FAKE_BACKEND_CONFTEST + FAKE_AGENT_CONFTEST)
    return pytester.path / "events.log"


@pytest.fixture
def fake_backend(pytester: pytest.Pytester) -> Path:
    """Install the fake backend in the pytester dir; returns the events log path."""
    pytester.makeconftest(FAKE_BACKEND_CONFTEST)
    return pytester.path / "events.log"


# --------------------------------------------------------------------------- fake sshd


class _Handle(paramiko.SFTPHandle):
    def stat(self) -> paramiko.SFTPAttributes:
        return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        paramiko.SFTPServer.set_file_attr(self.filename, attr)
        return paramiko.SFTP_OK


class _LocalSFTP(paramiko.SFTPServerInterface):
    """Just enough SFTP (open/stat/chattr) on the local filesystem for put/get."""

    def open(self, path, flags, attr):
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        handle = _Handle(flags)
        handle.filename = path
        handle.readfile = handle.writefile = os.fdopen(fd, mode)
        return handle

    def stat(self, path):
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno)

    lstat = stat

    def chattr(self, path, attr):
        paramiko.SFTPServer.set_file_attr(path, attr)
        return paramiko.SFTP_OK


def _exec(channel: paramiko.Channel, command: str) -> None:
    """Run the command with sh, like sshd does with the user's shell; no pty."""
    proc = subprocess.Popen(
        ["sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def pump(stream, send):
        for chunk in iter(lambda: stream.read1(4096), b""):
            send(chunk)

    pumps = [
        threading.Thread(target=pump, args=(proc.stdout, channel.sendall), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, channel.sendall_stderr), daemon=True),
    ]
    for t in pumps:
        t.start()
    rc = proc.wait()
    for t in pumps:
        t.join()
    # paramiko answers the exec request only after check_channel_exec_request returns:
    # a quick command could close the channel before that answer, and the client would
    # see "Channel closed" instead of its result.  Our client shuts its write side once
    # the exec request is answered, so its EOF (or a close) proves the answer was seen.
    channel.settimeout(60)
    try:
        while channel.recv(4096):
            pass
    except TimeoutError:
        pass
    channel.send_exit_status(rc if rc >= 0 else 128 - rc)
    channel.close()


class _Server(paramiko.ServerInterface):
    def __init__(self, key: paramiko.PKey) -> None:
        self.key = key

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        ok = key.get_base64() == self.key.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED_OPEN_REQUEST

    def check_channel_exec_request(self, channel, command):
        threading.Thread(target=_exec, args=(channel, command.decode()), daemon=True).start()
        return True


class FakeSSHD:
    """A real SSH server on 127.0.0.1 (paramiko) that runs commands locally as this user."""

    def __init__(self, client_key: Path) -> None:
        self.client_key = paramiko.RSAKey.from_private_key_file(str(client_key))
        self.host_key = paramiko.RSAKey.generate(2048)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FakeSSHD:
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _LocalSFTP)
            self.transports.append(transport)
            try:
                transport.start_server(server=_Server(self.client_key))
            except (paramiko.SSHException, EOFError, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()
        for t in self.transports:
            t.close()


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key pair made by ssh.generate_keypair (so that is exercised too)."""
    return generate_keypair(tmp_path_factory.mktemp("keys") / "id_rsa", bits=2048)


@pytest.fixture
def sshd_factory(client_key: Path):
    """``sshd_factory(start=True)`` makes a fake sshd; all are closed at teardown.

    With ``start=False`` the port is bound but not listening (connections are
    refused) until ``.start()``: a booting node, without a port-reuse race.
    """
    servers: list[FakeSSHD] = []

    def make(start: bool = True) -> FakeSSHD:
        server = FakeSSHD(client_key)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def sshd(sshd_factory) -> FakeSSHD:
    """A running fake sshd (``.port``)."""
    return sshd_factory()
