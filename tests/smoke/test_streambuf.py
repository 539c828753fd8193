"""-stream-buffer auto: the size rule, and the RTT read from a real kernel connection."""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from katamaran import streambuf
from katamaran.streambuf import SHORT_RTT, SIZE, auto_size, connection_rtt


@pytest.mark.parametrize(
    ("rtt", "size"),
    [
        (None, 0),  # no RTT from the kernel: its autotuning
        (0.00003, SIZE),  # loopback, a veth
        (SHORT_RTT, SIZE),
        (0.00011, 0),  # beyond a rack: the cap would cost more than the queue
        (0.0016, 0),  # the nested lab's nodes
    ],
)
def test_auto_size_is_set_only_on_a_short_path(rtt, size):
    assert auto_size(rtt) == size


@pytest.fixture
def connection():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    yield client, accepted
    for sock in (client, accepted, server):
        sock.close()


def ss_rtt_ms(port: int) -> dict[str, float]:
    """`ss -ti`'s rtt of each end of the loopback connection on `port`, by local port."""
    out = subprocess.run(
        ["ss", "-Htin", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ends = re.findall(r"127\.0\.0\.1:(\d+)\s+127\.0\.0\.1:\d+\s*\n?.*?\brtt:([\d.]+)/", out, re.S)
    return {local: float(rtt) for local, rtt in ends}


def test_connection_rtt_is_the_kernels_smoothed_rtt(connection):
    """Read at the handshake, before any data: both ends, as `ss -ti` shows them."""
    client, accepted = connection
    port = accepted.getsockname()[1]
    shown = ss_rtt_ms(port)
    for sock in (client, accepted):
        rtt = connection_rtt(sock)
        assert rtt is not None and rtt > 0
        local = str(sock.getsockname()[1])
        assert rtt * 1000 == pytest.approx(shown[local], abs=0.0015), (local, shown)


def test_size_stream_auto_follows_the_rule_for_the_connections_rtt(connection):
    """Loopback's handshake RTT is tens of microseconds, so SIZE is set; on a machine so
    loaded that the handshake took longer than SHORT_RTT (2 of 500 here under a CI run)
    the buffer must be left alone.  The RTT does not change between the two reads: no
    data flows."""
    client, accepted = connection
    before = client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    rtt = connection_rtt(client)
    line = streambuf.size_stream(client, streambuf.AUTO, socket.SO_SNDBUF)
    after = client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert rtt is not None and line is not None
    assert line.endswith(f"(connection RTT {rtt * 1000:.3f} ms)"), line
    if auto_size(rtt):
        assert line.startswith(f"RAM stream send buffer {SIZE >> 10} KiB"), line
        assert after != before and after == 2 * min(SIZE, wmem_max()), (before, after)
    else:
        assert line.startswith("RAM stream send buffer left to the kernel"), line
        assert after == before


def test_size_stream_explicit_and_zero(connection):
    client, accepted = connection
    before = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert streambuf.size_stream(accepted, 0, socket.SO_RCVBUF) is None
    assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before  # untouched
    assert streambuf.size_stream(accepted, 100000, socket.SO_RCVBUF) is None
    assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 200000


def wmem_max() -> int:
    with open("/proc/sys/net/core/wmem_max") as f:
        return int(f.read())
