"""ssh.py against a real SSH server (paramiko, in-process), and ping over an SSH handle."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import paramiko
import pytest

from pytest_katamaran.checks.ping import PingMonitor, assert_zero_drop
from pytest_katamaran.ssh import CommandFailed, CommandTimeout, SSHClient, generate_keypair


def _client(sshd, key: Path, **kw) -> SSHClient:
    return SSHClient("127.0.0.1", sshd.port, "root", key, connect_timeout=30, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_keypair_writes_openssh_files(tmp_path):
    key = generate_keypair(tmp_path / "k" / "id", bits=2048)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = (tmp_path / "k" / "id.pub").read_text()
    assert pub.startswith("ssh-rsa AAAA") and pub.endswith("katamaran-test\n")
    loaded = paramiko.RSAKey.from_private_key_file(str(key))
    assert pub.split()[1] == loaded.get_base64()
    # an existing key is kept (like the guide's setup.sh), the .pub is rewritten
    before = key.read_bytes()
    (tmp_path / "k" / "id.pub").unlink()
    generate_keypair(key)
    assert key.read_bytes() == before
    assert (tmp_path / "k" / "id.pub").read_text() == pub


def test_run_captures_output_rc_and_env(sshd, client_key):
    with _client(sshd, client_key) as ssh:
        ssh.wait_ready(timeout=10)
        res = ssh.run('echo out; echo err >&2; echo "$GREETING"', env={"GREETING": "hi there"})
        assert (res.rc, res.stdout, res.stderr) == (0, "out\nhi there\n", "err\n")
        assert res.ok
        big = ssh.run("head -c 3000000 /dev/zero | tr '\\0' x; head -c 300000 /dev/zero >&2")
        assert len(big.stdout) == 3_000_000 and len(big.stderr) == 300_000


def test_run_failure_message(sshd, client_key):
    with _client(sshd, client_key) as ssh:
        with pytest.raises(CommandFailed) as exc:
            ssh.run("echo partial; echo 'boom: no such thing' >&2; exit 3")
        text = str(exc.value)
        assert "rc=3" in text and "exit 3" in text and "boom: no such thing" in text
        assert f"127.0.0.1:{sshd.port}" in text
        assert exc.value.result.stdout == "partial\n"
        assert ssh.run("exit 4", check=False).rc == 4


def test_fake_sshd_closes_only_after_the_exec_answer(sshd, client_key, tmp_path, monkeypatch):
    """The server's answer to the exec request is held until the command has exited:
    the fake sshd must not close the channel before that answer (the client would
    then see "Channel closed" instead of rc=3; CI hit this once under load)."""
    from paramiko.common import MSG_CHANNEL_REQUEST, MSG_CHANNEL_SUCCESS

    marker = tmp_path / "exited"
    table = dict(paramiko.Transport._channel_handler_table)
    handle_request = table[MSG_CHANNEL_REQUEST]
    held = threading.Event()

    def hold_answer(chan, m):
        if not chan.transport.server_mode:
            return handle_request(chan, m)
        send = chan.transport._send_user_message

        def later(msg):
            if msg.asbytes()[:1] == bytes([MSG_CHANNEL_SUCCESS]):
                deadline = time.monotonic() + 10
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.2)  # what the old fake did meanwhile: exit status and close
                held.set()
            send(msg)

        chan.transport._send_user_message = later
        try:
            return handle_request(chan, m)
        finally:
            del chan.transport._send_user_message

    table[MSG_CHANNEL_REQUEST] = hold_answer
    monkeypatch.setattr(paramiko.Transport, "_channel_handler_table", table)
    with _client(sshd, client_key) as ssh:
        with pytest.raises(CommandFailed, match="rc=3"):
            ssh.run(f"touch {marker}; exit 3")
    assert held.is_set() and marker.exists()


def test_run_timeout(sshd, client_key):
    with _client(sshd, client_key) as ssh:
        start = time.monotonic()
        with pytest.raises(CommandTimeout, match="timed out after 1s"):
            ssh.run("echo begun; sleep 5", timeout=1)
        assert time.monotonic() - start < 4


def test_sudo_prefix_only_for_non_root(sshd, client_key):
    root = _client(sshd, client_key)
    assert root._wrap("id", sudo=True, env=None) == "id"
    user = SSHClient("127.0.0.1", sshd.port, "ubuntu", client_key)
    assert user._wrap("id -u", sudo=True, env={"A": "b c"}) == (
        "sudo -n sh -c 'export A='\"'\"'b c'\"'\"'; id -u'"
    )
    with root:
        assert root.sudo("id -u").stdout.strip() == str(os.geteuid())


def test_put_and_get_over_sftp(sshd, client_key, tmp_path):
    src = tmp_path / "tool"
    src.write_bytes(os.urandom(200_000))
    src.chmod(0o755)
    remote = str(tmp_path / "remote-copy")
    with _client(sshd, client_key) as ssh:
        ssh.put(src, remote)
        assert Path(remote).read_bytes() == src.read_bytes()
        assert stat.S_IMODE(Path(remote).stat().st_mode) == 0o755
        back = tmp_path / "sub" / "back"
        ssh.get(remote, back)
        assert back.read_bytes() == src.read_bytes()


def test_start_background_command_and_signal_it(sshd, client_key):
    with _client(sshd, client_key) as ssh:
        proc = ssh.start(
            "sh -c 'trap \"echo got-int; exit 7\" INT; echo ready; while :; do sleep 0.05; done'"
        )
        assert proc.pid and proc.pid > 0
        deadline = time.monotonic() + 5
        while "ready" not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.is_running()
        os.kill(proc.pid, 0)  # the PID is the command's own (same host here)
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 7
        assert proc.output() == "ready\ngot-int\n"
        assert not proc.is_running()


def test_close_stops_leftover_background_commands(sshd, client_key):
    ssh = _client(sshd, client_key)
    proc = ssh.start("sleep 60")
    pid = proc.pid
    ssh.close()
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_wait_ready_times_out_with_address_and_last_error(client_key):
    port = _free_port()
    ssh = SSHClient("127.0.0.1", port, "root", client_key, connect_timeout=1)
    with pytest.raises(TimeoutError) as exc:
        ssh.wait_ready(timeout=1.5, interval=0.2)
    text = str(exc.value)
    assert f"root@127.0.0.1:{port}" in text and "last error" in text
    assert "refused" in text.lower()


def test_wait_ready_retries_until_server_comes_up(client_key, sshd_factory):
    server = sshd_factory(start=False)
    threading.Timer(1.0, server.start).start()
    ssh = SSHClient("127.0.0.1", server.port, "root", client_key, connect_timeout=5)
    try:
        ssh.wait_ready(timeout=20, interval=0.2)
        assert ssh.run("echo up").stdout == "up\n"
    finally:
        ssh.close()


class _SSHNode:
    """A fake node whose SSH is real (to the in-process server)."""

    def __init__(self, ssh: SSHClient) -> None:
        self.name = "node-fake"
        self.ssh = ssh
        self.private_ip = "127.0.0.1"


def test_ping_fixture_over_ssh_handle(sshd, client_key, ping):
    """The zero-drop ping path of a real node: SSHClient.start + SIGINT via kill."""
    with _client(sshd, client_key) as ssh:
        monitor = ping(_SSHNode(ssh), "127.0.0.1", interval=0.01)
        assert isinstance(monitor, PingMonitor) and monitor.running
        time.sleep(1.0)
        stats = monitor.stop()
        assert stats.sent > 20 and stats.summary is not None
        assert monitor.exit_code == 0
        assert_zero_drop(stats)
