"""The destination's own listeners: source filter, scanners, TLS, ports.

The first group needs no QEMU: real sockets on loopback (127.0.0.1 and 127.0.0.2 are
both local, so one host can play the source and a stranger).  The second group runs
real migrations in the one-machine lab (pytest_katamaran/lab/local.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from katamaran import streambuf
from katamaran.config import host_port
from katamaran.listener import MigrationListener, open_listener
from katamaran.qmp import Monitor
from pytest_katamaran.certs import SERVER_SAN, OpensslMissing, lab_certs
from pytest_katamaran.lab.local import qmp, wait_for_text
from pytest_katamaran.net.hostlab import run_in_netns, scratch_netns
from pytest_katamaran.qemu.sandbox import Sandbox

SOURCE = "127.0.0.2"
STRANGER = "127.0.0.1"


def connect_from(
    local: str, host: str, port: int, timeout: float = 1.5, send: bytes = b""
) -> tuple[str, bytes]:
    """("connected"|"timeout"|"refused", first bytes read) for one client."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.bind((local, 0))
        try:
            sock.connect((host, port))
        except TimeoutError:
            return "timeout", b""
        except ConnectionRefusedError:
            return "refused", b""
        if send:
            sock.sendall(send)
        try:
            return "connected", sock.recv(64)
        except TimeoutError:
            return "connected", b""
        except ConnectionResetError:
            return "connected", b""


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize("listen_ip", [None, "127.0.0.1"], ids=["dual-stack", "ipv4"])
def test_source_filter_gives_strangers_no_syn_ack(listen_ip):
    """The kernel runs the listener's filter before the SYN: a stranger's connect times out."""
    listen = ip(listen_ip) if listen_ip else None
    server = open_listener("test", 0, listen, ip(SOURCE))
    port = server.getsockname()[1]
    host = listen_ip or "127.0.0.1"
    greeting = b"NBDMAGIC"

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(greeting)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        if listen_ip is None:  # the same socket bound to 127.0.0.2 too (it is `::`)
            assert connect_from(STRANGER, "127.0.0.2", port) == ("timeout", b"")
        assert connect_from(STRANGER, host, port) == ("timeout", b"")
        assert connect_from(SOURCE, host, port) == ("connected", greeting)
    finally:
        server.close()
        thread.join(5)


def test_source_filter_ipv6_source():
    server = open_listener("test", 0, None, ip("::1"))
    port = server.getsockname()[1]
    try:
        server.settimeout(5)
        assert connect_from(STRANGER, "127.0.0.1", port) == ("timeout", b"")
        with socket.create_connection(("::1", port), timeout=5):
            conn, addr = server.accept()
            conn.close()
        assert addr[0] == "::1"
    finally:
        server.close()


def test_listener_bind_conflict_is_one_line():
    holder = open_listener("test", 0, ip("127.0.0.1"), None)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(Exception) as err:
            open_listener("NBD server start failed on port 1", port, ip("127.0.0.1"), None)
        assert str(err.value) == (
            f"NBD server start failed on port 1: cannot listen on 127.0.0.1:{port}: "
            "Address already in use"
        )
    finally:
        holder.close()


def test_migration_listener_skips_scanners_and_hands_over_the_stream():
    """Idle, HTTP, TLS-less and stranger connections are closed; the stream is handed on."""
    lines: list[str] = []
    server = open_listener("test", 0, None, ip(SOURCE))
    port = server.getsockname()[1]
    listener = MigrationListener(server, False, ip(SOURCE), lines.append, timeout=1.0)

    async def scenario() -> tuple[str, bytes, list[tuple[str, bytes]]]:
        loop = asyncio.get_running_loop()
        got: dict[str, bytes] = {}

        async def hand_over(conn: socket.socket, peer: str) -> None:
            got[peer] = await loop.sock_recv(conn, 64)

        def clients() -> list[tuple[str, bytes]]:
            idle = socket.create_connection(("127.0.0.1", port), source_address=(SOURCE, 0))
            results = [
                connect_from(STRANGER, "127.0.0.1", port, send=b"QEVM"),
                connect_from(SOURCE, "127.0.0.1", port, send=b"GET / HTTP/1.0\r\n\r\n"),
                connect_from(SOURCE, "127.0.0.1", port, send=b"\x16\x03\x01\x02"),
            ]
            with socket.create_connection(("127.0.0.1", port), source_address=(SOURCE, 0)) as s:
                s.sendall(b"QEV")
                time.sleep(0.1)  # the magic split across segments still counts
                s.sendall(b"M\x00\x00\x00\x03")
                time.sleep(0.5)
            idle.close()
            return results

        accepted = asyncio.create_task(listener.accept_stream(hand_over))
        results = await asyncio.to_thread(clients)
        peer = await asyncio.wait_for(accepted, 5)
        return peer, got[peer], results

    peer, data, results = asyncio.run(scenario())
    assert peer == SOURCE
    assert data == b"QEVM\x00\x00\x00\x03"
    stranger, http, tls = results
    assert stranger == ("timeout", b""), "the filter let a stranger in"
    assert http == ("connected", b""), "an HTTP request must be closed unanswered"
    assert tls == ("connected", b"")
    assert any("first bytes 474554" in line for line in lines), lines  # "GET"
    assert any("first bytes 1603" in line for line in lines), lines
    assert server.fileno() == -1, "the listener must be closed once the stream is handed over"


# --- real migrations in the one-machine lab ------------------------------------------

DEST = "10.0.0.2"


def migrated(rig, source, dest) -> None:
    src_rc, dst_rc = rig.finish(source), rig.finish(dest)
    logs = f"\nsource:\n{rig.log('source.log')}\ndest:\n{rig.log('dest.log')}"
    assert (src_rc, dst_rc) == (0, 0), logs
    assert rig.status(rig.dst) == "running", logs
    assert rig.status(rig.src) == "postmigrate", logs


def tcp_listeners(rig, node: str) -> str:
    """`ss -tln` in a node: what still listens there."""
    ss = rig.lab.run(node, ["ss", "-Htln"], capture_output=True, text=True, check=True)
    return ss.stdout


def no_listener_left(rig, *ports: int) -> None:
    left = tcp_listeners(rig, "b")
    for port in ports:
        assert f":{port} " not in left, f"port {port} still listens on node b:\n{left}"


def katamaran_state_left(path: Path) -> list[str]:
    """TLS objects / parameters a run may have left on a QEMU."""

    async def objects() -> list[dict[str, str]]:
        mon = Monitor(path, 60)
        await mon.connect()
        try:
            return await mon.execute("qom-list", {"path": "/objects"})
        finally:
            await mon.close()

    left = [o["name"] for o in asyncio.run(objects()) if "katamaran" in o["name"]]
    params = qmp(path, "query-migrate-parameters")
    left += [f"{k}={params[k]}" for k in ("tls-creds", "tls-hostname") if params.get(k)]
    return left


@pytest.mark.qemu
def test_scanners_on_both_ports_do_not_disturb_the_wait(rig_factory):
    """Idle and HTTP connections on 4444 and 10809 while the destination waits."""
    rig = rig_factory()
    rig.up()
    dest = rig.start_dest()
    log = rig.log("dest.log")
    assert (
        "WARNING: NBD export drive-virtio-disk0 (read-write) on [::]:10809 and the migration "
        "port [::]:4444 are open to any host that reaches this node, until the VM resumes"
    ) in log, log
    assert log.count("open to any host") == 1, log
    http = b"GET / HTTP/1.0\r\nHost: 10.0.0.2\r\n\r\n"

    def scan() -> tuple[list[socket.socket], list[tuple[str, bytes]]]:
        # Held through the migration.  QEMU (max-connections 1) serves the idle NBD client
        # until its handshake limit drops it (10 s in Debian's 7.2, CVE-2024-7409 fix):
        # the source waits for it, which is why this test takes ~10 s longer.
        found = [
            connect_from("10.0.0.1", DEST, 4444, send=http),
            connect_from("10.0.0.1", DEST, 10809),  # a port scanner: connect, read, close
            connect_from("10.0.0.1", DEST, 10809, send=http),
        ]
        idle = [socket.create_connection((DEST, port), timeout=5) for port in (4444, 10809)]
        idle[1].recv(8)  # greeted: it holds QEMU's one NBD connection (max-connections 1)
        found.append(connect_from("10.0.0.1", DEST, 10809))  # a second client meanwhile
        return idle, found

    idle, (mig_http, nbd_scan, nbd_http, nbd_second) = run_in_netns(rig.lab.a.netns, scan)
    try:
        assert mig_http == ("connected", b""), "an HTTP request on 4444 got an answer"
        assert nbd_scan[1].startswith(b"NBDMAGIC"), nbd_scan  # open to all: documented
        assert nbd_second == ("connected", b""), "a second NBD client was served at once"
        source = rig.start_source()
        migrated(rig, source, dest)
    finally:
        for sock in idle:
            sock.close()
    log = rig.log("dest.log")
    assert "closed a connection from 10.0.0.1 to [::]:4444: not a migration stream" in log, log
    assert "migration stream from 10.0.0.1 handed to QEMU" in log, log
    no_listener_left(rig, 4444, 10809)


@pytest.fixture
def isolated_netns():
    """A netns with only lo (before rig_factory: it goes after the rig's QEMU)."""
    with scratch_netns("kmr-iso") as name:
        yield name


@pytest.mark.qemu
def test_a_destination_qemu_in_its_own_netns_gets_both_streams(isolated_netns, rig_factory):
    """A Kata QEMU lives in its pod's netns, which node traffic does not reach: the
    destination katamaran accepts the NBD and migration connections in the node's netns
    and hands them to QEMU (getfd), so the migration (storage and RAM) completes though
    QEMU's netns holds nothing but lo and its tap and has no route to the source."""
    iso = isolated_netns
    rig = rig_factory(dest_netns=iso)
    rig.up()
    unreachable = subprocess.run(
        ["ip", "-n", iso, "route", "get", "10.0.0.1"], capture_output=True, text=True
    )
    assert unreachable.returncode != 0, unreachable.stdout  # no way to the source
    dest = rig.start_dest("-source-ip", "10.0.0.1")
    source = rig.start_source()
    migrated(rig, source, dest)
    log = rig.log("dest.log")
    assert "migration stream from 10.0.0.1 handed to QEMU" in log, log
    listening = subprocess.run(
        ["ip", "netns", "exec", iso, "ss", "-Htln"], capture_output=True, text=True
    )
    assert listening.stdout.strip() == "", listening.stdout  # QEMU never listened
    assert f"storage synchronized ({rig.disk_mib}.0 MiB)" in rig.log("source.log")
    no_listener_left(rig, 4444, 10809)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("source_ip", "dest_ip"),
    [("10.0.0.1", DEST), ("fd00:10::1", "fd00:10::2")],
    ids=["ipv4", "ipv6"],
)
def test_source_ip_gives_other_hosts_no_nbd_greeting(rig_factory, source_ip, dest_ip):
    """With -source-ip other addresses on node a (v4 and v6) get no SYN-ACK on either port."""
    rig = rig_factory()
    rig.up()
    # Strangers on node a.  The IPv6 one is deprecated (preferred_lft 0) so that the
    # kernel never picks it as the source's own address; bound explicitly it still works.
    link = rig.lab.a.ifname
    for cmd in (
        ["ip", "addr", "add", "10.0.0.3/24", "dev", link],
        ["ip", "addr", "add", "fd00:10::3/64", "dev", link, "nodad", "preferred_lft", "0"],
    ):
        rig.lab.run("a", cmd, check=True)
    dest = rig.start_dest("-source-ip", source_ip)
    log = rig.log("dest.log")
    assert "open to any host" not in log, log
    assert f"only for {source_ip}" in log, log

    def probe() -> dict[str, tuple[str, bytes]]:
        found = {}
        for port in (10809, 4444):
            found[f"10.0.0.3:{port}"] = connect_from("10.0.0.3", DEST, port, send=b"QEVM")
            found[f"fd00:10::3:{port}"] = connect_from("fd00:10::3", "fd00:10::2", port)
        other = "fd00:10::1" if ":" not in source_ip else "10.0.0.1"  # same host, other family
        other_dest = "fd00:10::2" if ":" in other else DEST
        found[f"{other}:10809"] = connect_from(other, other_dest, 10809)
        # Controls: the source's own address is answered, and the strangers reach node b
        # (a closed port answers them with a reset), so a timeout above is the filter.
        found["control"] = connect_from(source_ip, dest_ip, 10809)
        found["path4"] = connect_from("10.0.0.3", DEST, 9)
        found["path6"] = connect_from("fd00:10::3", "fd00:10::2", 9)
        return found

    found = run_in_netns(rig.lab.a.netns, probe)
    control = found.pop("control")
    assert control[0] == "connected" and control[1].startswith(b"NBDMAGIC"), control
    assert found.pop("path4") == found.pop("path6") == ("refused", b"")
    assert found == dict.fromkeys(found, ("timeout", b"")), found
    source = rig.start_source(dest_ip)
    migrated(rig, source, dest)
    no_listener_left(rig, 4444, 10809)


def make_certs(tmp: Path, server_san: str = SERVER_SAN) -> Path:
    """The lab's certificates (pytest_katamaran.certs); skipped without openssl."""
    try:
        return lab_certs(tmp, server_san)
    except OpensslMissing as err:
        pytest.skip(str(err))


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("source_ip", "dest_ip"),
    [("10.0.0.1", DEST), ("fd00:10::1", "fd00:10::2")],
    ids=["ipv4", "ipv6"],
)
def test_tls_migration_nbd_and_ram(rig_factory, tmp_path, source_ip, dest_ip):
    """Both streams over TLS, restricted to the source and bound to one address."""
    certs = make_certs(tmp_path)
    rig = rig_factory()
    rig.up()
    tls = ("-tls", "-tls-dir", str(certs))
    dest = rig.start_dest(*tls, "-source-ip", source_ip, "-listen-ip", dest_ip)
    nbd, mig = host_port(dest_ip, 10809), host_port(dest_ip, 4444)
    log = rig.log("dest.log")
    assert f"NBD on {nbd}, incoming migration on {mig} (TLS)" in log, log
    listening = tcp_listeners(rig, "b")
    assert f"{nbd} " in listening and f"{mig} " in listening, listening
    source = rig.start_source(dest_ip, *tls)
    migrated(rig, source, dest)
    # The destination accepts only a TLS handshake with -tls: the stream was TLS.
    assert f"migration stream from {source_ip} handed to QEMU" in rig.log("dest.log")
    assert katamaran_state_left(rig.src.qmp_path) == []
    assert katamaran_state_left(rig.dst.qmp_path) == []
    no_listener_left(rig, 4444, 10809)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("dest_tls", "source_tls", "server_san", "error"),
    [
        (True, False, SERVER_SAN, "TLS negotiation required before option 7 (go)"),
        (False, True, SERVER_SAN, "Denied by server for option 5 (starttls)"),
        (True, True, "IP:10.9.9.9", "does not match"),
    ],
    ids=["plain-source", "plain-dest", "wrong-server-name"],
)
def test_tls_mismatch_fails_cleanly_and_source_keeps_running(
    rig_factory, tmp_path, dest_tls, source_tls, server_san, error
):
    certs = make_certs(tmp_path, server_san)
    rig = rig_factory()
    rig.up()
    tls = ("-tls", "-tls-dir", str(certs))
    dest = rig.start_dest(*(tls if dest_tls else ()))
    source = rig.start_source(DEST, *(tls if source_tls else ()))
    rc = rig.finish(source)
    log = rig.log("source.log")
    assert rc == 1, log
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "drive-mirror failed" in errors[0], log
    assert error in errors[0], log
    assert "Traceback" not in log
    assert rig.status(rig.src) == "running"
    assert katamaran_state_left(rig.src.qmp_path) == []
    dest.send_signal(signal.SIGTERM)
    assert rig.finish(dest) == 130, rig.log("dest.log")
    assert qmp(rig.dst.qmp_path, "query-block-exports") == []
    assert katamaran_state_left(rig.dst.qmp_path) == []
    no_listener_left(rig, 4444, 10809)


def tls_hello(host: str, port: int) -> str:
    """A TLS client with no certificate (a TLS health check): what it saw."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            with ctx.wrap_socket(sock) as tls:
                return f"handshake done, {tls.version()}"
        except (ssl.SSLError, OSError) as err:
            return f"handshake failed: {err}"


@pytest.mark.qemu
def test_tls_without_source_ip_a_strangers_handshake_ends_the_wait(rig_factory, tmp_path):
    """With -tls and no -source-ip the first TLS connection goes to QEMU (the listener
    cannot check a certificate): a client without one of the CA.  QEMU refuses it and
    stays silent, with its one incoming migration used up; the destination says so and
    ends within TLS_START_S (it waited -dest-timeout before) with nothing left, and the
    source, finding the port closed, keeps its VM running."""
    from katamaran.dest import TLS_START_S

    certs = make_certs(tmp_path)
    rig = rig_factory()
    rig.up()
    tls = ("-tls", "-tls-dir", str(certs))
    dest = rig.start_dest(*tls)
    log = rig.log("dest.log")
    assert "WARNING: -tls without -source-ip" in log, log
    began = time.monotonic()
    seen = run_in_netns(rig.lab.a.netns, lambda: tls_hello(DEST, 4444))
    rc = rig.finish(dest, TLS_START_S + 60)
    took = time.monotonic() - began
    log = rig.log("dest.log")
    assert rc == 1, log
    assert "migration stream from 10.0.0.1 handed to QEMU" in log, (seen, log)
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the TLS stream from 10.0.0.1 became no migration" in errors[0]
    assert took < TLS_START_S + 30, f"{took:.1f}s: the wait was not cut at the handshake"
    assert qmp(rig.dst.qmp_path, "query-block-exports") == []
    assert katamaran_state_left(rig.dst.qmp_path) == []
    no_listener_left(rig, 4444, 10809)
    source = rig.start_source(DEST, *tls)
    assert rig.finish(source) == 1, rig.log("source.log")
    assert rig.status(rig.src) == "running"
    assert katamaran_state_left(rig.src.qmp_path) == []


@pytest.mark.qemu
def test_two_destinations_on_one_node_on_different_ports(rig_factory, tmp_path):
    """A second waiting destination (default ports) beside a migration on 10810/4445."""
    rig = rig_factory()
    rig.up()
    assert rig.dst.spec is not None
    disk2 = tmp_path / "dst2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk2, "64M"], check=True)
    spec2 = dataclasses.replace(rig.dst.spec, tap=None, run_dir=tmp_path / "c", disk=disk2)
    second = Sandbox()
    try:
        second.start(spec2, netns=rig.lab.b.netns)
        waiting = rig.katamaran("b", "-mode", "dest", "-qmp", str(second.qmp_path), log="d2.log")
        wait_for_text(tmp_path / "d2.log", "destination ready", 60, waiting)
        ports = ("-nbd-port", "10810", "-migration-port", "4445")
        dest = rig.start_dest(*ports)
        listening = tcp_listeners(rig, "b")
        for port in (10809, 4444, 10810, 4445):
            assert f":{port} " in listening, listening
        source = rig.start_source(DEST, *ports)
        migrated(rig, source, dest)
        assert "migrating RAM to 10.0.0.2:4445" in rig.log("source.log")
        no_listener_left(rig, 10810, 4445)
        listening = tcp_listeners(rig, "b")
        assert ":10809 " in listening and ":4444 " in listening, "the other destination lost"
        waiting.send_signal(signal.SIGTERM)
        assert rig.finish(waiting) == 130, rig.log("d2.log")
        no_listener_left(rig, 10809, 4444)
    finally:
        second.stop()


def stream_buffers(rig, port: int) -> dict[str, tuple[int, int]]:
    """Each node's (rb, tb) skmem of its end of the TCP connection on `port`."""
    found = {}
    for node in ("a", "b"):
        ss = rig.lab.run(
            node,
            ["ss", "-Htnm", "state", "established", f"( sport = :{port} or dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rb, tb = re.search(r"\brb(\d+)\b", ss), re.search(r"\btb(\d+)\b", ss)
        assert rb and tb, f"no connection on port {port} in node {node}:\n{ss}"
        found[node] = (int(rb.group(1)), int(tb.group(1)))
    return found


def kernel_buffer(rig, node: str, which: str, asked: int) -> int:
    """What the kernel makes of SO_{SND,RCV}BUF `asked`: doubled, capped by *mem_max."""
    cap = int(
        rig.lab.run(
            node,
            ["sysctl", "-n", f"net.core.{which}_max"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return 2 * min(asked, cap)


@pytest.mark.qemu
@pytest.mark.parametrize("size", [100000, 262144, "auto"])
def test_stream_buffer_bounds_both_ends_of_the_ram_stream(rig_factory, size):
    """The RAM stream's buffers are -stream-buffer on both nodes (source SO_SNDBUF, the
    destination's SO_RCVBUF), read from the kernel with the migration held: the
    destination QEMU is SIGSTOPped, so the stream stays open in the RAM phase.  "auto"
    (the default, no flag given) sizes each end from its connection's RTT: on the lab's
    veth (a short path) that is streambuf.SIZE, and each end says so."""
    extra = () if size == "auto" else ("-stream-buffer", str(size))
    rig = rig_factory(shared=True)
    rig.up()
    dest = rig.start_dest(*extra)
    assert rig.dst.pid is not None
    os.kill(rig.dst.pid, signal.SIGSTOP)
    try:
        source = rig.start_source(DEST, *extra)
        wait_for_text(rig.tmp / "source.log", "migrating RAM", 60, source)
        if size == "auto":  # sized once the stream is accepted, before QEMU gets it
            wait_for_text(rig.tmp / "dest.log", "RAM stream receive buffer", 60, dest)
        found = stream_buffers(rig, 4444)
    finally:
        os.kill(rig.dst.pid, signal.SIGCONT)
    migrated(rig, source, dest)
    sizes = {"a": size, "b": size}
    if size == "auto":
        for node, log, which in (("a", "source.log", "send"), ("b", "dest.log", "receive")):
            chosen = re.search(
                rf"RAM stream {which} buffer (\d+ KiB|left to the kernel) "
                r"\(connection RTT ([\d.]+) ms\)",
                rig.log(log),
            )
            assert chosen, rig.log(log)
            # the rule for the RTT that end read (a loaded machine may exceed SHORT_RTT)
            sizes[node] = streambuf.auto_size(float(chosen.group(2)) / 1000)
            if not sizes[node]:
                assert chosen.group(1) == "left to the kernel", chosen.group(0)
                pytest.skip(
                    f"{chosen.group(0)}: this run's handshake was too slow to check the size"
                )
            assert chosen.group(1) == f"{streambuf.SIZE >> 10} KiB", chosen.group(0)
    assert found["a"][1] == kernel_buffer(rig, "a", "wmem", sizes["a"]), (found, sizes)
    assert found["b"][0] == kernel_buffer(rig, "b", "rmem", sizes["b"]), (found, sizes)
