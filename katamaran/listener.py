"""Listening sockets the destination owns: bound here, filtered to the source, handed to QEMU.

Why katamaran, not QEMU, listens:
- QEMU may run in a pod network namespace behind Kata's tcfilter, where node traffic
  cannot reach it; a socket made here lives in katamaran's (the node's) namespace.
- QEMU's NBD server sends its greeting to whoever connects, before any TLS, and QEMU's
  migration listener takes the first connection as the migration stream.  A socket
  filter on a socket katamaran creates keeps other hosts out of both, and for the
  migration stream katamaran looks at the first bytes before QEMU sees the connection.

The filter is classic BPF (SO_ATTACH_FILTER).  For TCP the kernel runs a listening
socket's filter on every segment before the SYN is processed (`tcp_filter()` in
tcp_v4_rcv/tcp_v6_rcv), so a host the filter rejects gets no SYN-ACK at all; accepted
connections inherit the filter.  `tests/integration/test_listeners.py` checks this.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable

from .aio import within
from .config import IPAddress, host_port
from .errors import KatamaranError

# Classic BPF opcodes (linux/filter.h) and the base of network-header-relative loads.
BPF_LD_B_ABS = 0x30
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_NET_OFF = -0x100000
SO_ATTACH_FILTER = 26
ACCEPT_ALL = 0xFFFFFFFF

MIGRATION_MAGIC = b"QEVM"  # QEMU_VM_FILE_MAGIC 0x5145564D, the first bytes of a stream
TLS_HANDSHAKE = b"\x16\x03"  # a TLS handshake record (ClientHello), any TLS 1.x
FIRST_BYTES_TIMEOUT = 15.0  # s a connection gets to show it is a migration stream
MAX_PENDING = 32  # connections being looked at at once; more are closed at once


def plain(ip: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d -> a.b.c.d: what a dual-stack socket reports for an IPv4 peer."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def source_filter(source: IPAddress) -> list[tuple[int, int, int, int]]:
    """A classic BPF program accepting only packets whose IP source is `source`.

    Loads are relative to the network header (SKF_NET_OFF): at the socket filter the
    packet data starts at the TCP header.  The IP version nibble is checked first, so
    the same program works on an IPv4 socket and on a dual-stack IPv6 socket (which
    sees IPv4 peers with an IPv4 header).
    """
    source = plain(source)
    net = SKF_NET_OFF & 0xFFFFFFFF
    version = 0x40 if source.version == 4 else 0x60
    if source.version == 4:
        offsets = [12]  # iphdr.saddr
    else:
        offsets = [8, 12, 16, 20]  # ipv6hdr.saddr, four words
    words = struct.unpack(f"!{len(offsets)}I", source.packed)
    prog: list[tuple[int, int, int, int]] = [
        (BPF_LD_B_ABS, 0, 0, net),
        (BPF_ALU_AND_K, 0, 0, 0xF0),
    ]
    # Each compare jumps to the final `drop` on mismatch; count the rest to get there.
    remaining = 1 + 2 * len(offsets)  # this jeq's followers: loads+compares, then accept
    prog.append((BPF_JEQ_K, 0, remaining, version))
    for i, (offset, word) in enumerate(zip(offsets, words, strict=True)):
        left = 2 * (len(offsets) - i - 1) + 1  # instructions after this jeq up to accept
        prog.append((BPF_LD_W_ABS, 0, 0, (net + offset) & 0xFFFFFFFF))
        prog.append((BPF_JEQ_K, 0, left, word))
    prog.append((BPF_RET_K, 0, 0, ACCEPT_ALL))
    prog.append((BPF_RET_K, 0, 0, 0))
    return prog


def attach_source_filter(sock: socket.socket, source: IPAddress) -> None:
    prog = source_filter(source)
    code = b"".join(struct.pack("HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_listener(
    what: str,
    port: int,
    listen_ip: IPAddress | None,
    source_ip: IPAddress | None,
    rcvbuf: int = 0,
) -> socket.socket:
    """A listening TCP socket on `listen_ip` (or `::`, dual stack, else 0.0.0.0).

    With `source_ip` the socket filter is attached before listen(), so not one
    segment from another host is ever answered.  `rcvbuf` (the RAM stream's
    -stream-buffer) is set before listen() too: accepted connections inherit it, and the
    window they offer is scaled for it from the SYN-ACK on.
    """
    if listen_ip is not None:
        candidates = [(socket.AF_INET if listen_ip.version == 4 else socket.AF_INET6, listen_ip)]
    else:
        candidates = [
            (socket.AF_INET6, ipaddress.ip_address("::")),
            (socket.AF_INET, ipaddress.ip_address("0.0.0.0")),
        ]
    last: OSError | None = None
    for family, host in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as err:  # IPv6 disabled in this kernel
            last = err
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if source_ip is not None:
                attach_source_filter(sock, source_ip)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((str(host), port))
            sock.listen(16)
            return sock
        except OSError as err:
            sock.close()
            last = err
            if err.errno != errno.EADDRNOTAVAIL or listen_ip is not None:
                raise KatamaranError(
                    f"{what}: cannot listen on {host_port(host, port)}: {err.strerror or err}"
                ) from None
    assert last is not None
    raise KatamaranError(f"{what}: cannot listen on port {port}: {last.strerror or last}")


def bound_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return host_port(host, port)


async def _first_bytes(sock: socket.socket, want: bytes, timeout: float) -> bytes:
    """Peek (never consume: QEMU reads them) at the first bytes, up to len(want).

    Returns early as soon as what arrived cannot be a prefix of `want`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            data = sock.recv(len(want), socket.MSG_PEEK)
        except BlockingIOError:
            data = None
        if data is not None:
            if not data or len(data) >= len(want) or not want.startswith(data):
                return data
        remaining = deadline - loop.time()
        if remaining <= 0:
            return data or b""
        if data:  # a partial prefix: the socket stays readable, so poll instead of waiting
            await asyncio.sleep(min(0.02, remaining))
            continue
        await _readable(loop, sock, remaining)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> None:
    """Return once `sock` is readable (data or EOF), or after `timeout`."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await within(ready, timeout)
    except asyncio.TimeoutError:  # the builtin only from 3.11
        pass
    finally:
        loop.remove_reader(sock.fileno())


class MigrationListener:
    """Accepts connections on the migration port and hands the first real stream on.

    Each connection is looked at in its own task, so an idle scanner never delays the
    source; one from another host than `source_ip`, or whose first bytes are not a
    migration stream (`QEVM`, or with TLS a handshake record), is closed and the wait
    goes on.  The listener is closed once a stream has been handed over.
    """

    def __init__(
        self,
        sock: socket.socket,
        tls: bool,
        source_ip: IPAddress | None,
        report: Callable[[str], None],
        timeout: float = FIRST_BYTES_TIMEOUT,
    ) -> None:
        self.sock = sock
        self.want = TLS_HANDSHAKE if tls else MIGRATION_MAGIC
        self.tls = tls
        self.source_ip = plain(source_ip) if source_ip is not None else None
        self.report = report
        self.timeout = timeout
        self.address = bound_address(sock)
        self.rejected = 0

    def close(self) -> None:
        self.sock.close()

    async def accept_stream(
        self, hand_over: Callable[[socket.socket, str], Awaitable[None]]
    ) -> str:
        """Wait for the first valid stream, pass it to `hand_over`, close the listener.

        Returns the peer's address.
        """
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        found: asyncio.Queue[tuple[socket.socket, str]] = asyncio.Queue()
        checks: set[asyncio.Task[None]] = set()
        acceptor = asyncio.create_task(self._accept_loop(loop, found, checks))
        getter = asyncio.create_task(found.get())
        try:
            await asyncio.wait({acceptor, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                err = acceptor.exception()
                raise KatamaranError(f"accepting on {self.address} failed: {err}")
            conn, peer = getter.result()
        finally:
            for task in (acceptor, getter, *checks):
                task.cancel()
            await asyncio.gather(acceptor, getter, *checks, return_exceptions=True)
            self.close()
        try:
            await hand_over(conn, peer)
        finally:
            conn.close()  # QEMU holds its own copy now
        while not found.empty():
            found.get_nowait()[0].close()
        return peer

    async def _accept_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        found: asyncio.Queue[tuple[socket.socket, str]],
        checks: set[asyncio.Task[None]],
    ) -> None:
        while True:
            conn, addr = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            peer = plain(ipaddress.ip_address(addr[0].split("%")[0]))
            if self.source_ip is not None and peer != self.source_ip:
                conn.close()  # the socket filter already keeps others out; belt and braces
                self._reject(peer, f"not the source {self.source_ip}")
                continue
            if len(checks) >= MAX_PENDING:
                conn.close()
                self._reject(peer, f"{MAX_PENDING} connections already being checked")
                continue
            task = asyncio.create_task(self._check(conn, str(peer), found))
            checks.add(task)
            task.add_done_callback(checks.discard)

    async def _check(
        self, conn: socket.socket, peer: str, found: asyncio.Queue[tuple[socket.socket, str]]
    ) -> None:
        try:
            data = await _first_bytes(conn, self.want, self.timeout)
        except OSError as err:
            conn.close()
            self._reject(peer, err.strerror or str(err))
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        if data == self.want:
            found.put_nowait((conn, peer))
            return
        conn.close()
        if not data:
            why = f"sent nothing within {self.timeout:g} s"
        elif self.tls and MIGRATION_MAGIC.startswith(data[: len(MIGRATION_MAGIC)]):
            why = "a migration stream without TLS (is the source running without -tls?)"
        else:
            kind = "a TLS handshake" if self.tls else "a migration stream"
            why = f"not {kind} (first bytes {data.hex()})"
        self._reject(peer, why)

    def _reject(self, peer: object, why: str) -> None:
        self.rejected += 1
        self.report(f"closed a connection from {peer} to {self.address}: {why}")


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
