"""The RAM migration stream's socket buffers: what QEMU can have queued when it pauses the VM.

Why.  QEMU pauses the VM once the RAM it has not sent yet fits in -downtime-limit, but
what it already wrote into the socket is still queued in the source's send buffer and
the destination's receive buffer; the destination loads it during the pause, and the
source's disk flush at STOP waits behind it (the destination's NBD server answers in
the same main loop).  The kernel's autotuning grows both buffers to megabytes where the
destination is slower than the network (one-machine lab, 2026-12-01: 4 MiB + 2.6 MB,
STOP -> RESUME 32-36 ms against bare QEMU's 24-29; 256 KiB on both ends: 8-17 ms).  A
small buffer also caps the stream at about 2 x buffer / RTT: in the nested two-node lab
256 KiB made the migration 11-36 % longer.

How ("auto", the default).  Each end reads the connection's round-trip time from the
kernel (TCP_INFO's smoothed RTT, set by the handshake before any data flows).  On a
short path (RTT <= SHORT_RTT: the same host, a rack) it asks for SIZE, which still
carries 2 x SIZE / SHORT_RTT = 5 GB/s; on a longer one it leaves the buffer to the
kernel.  A first rule, the bandwidth-delay product of a 10 Gb/s stream at the
handshake's RTT, made the nested lab's RAM phase 2.9x longer (11.9 s against 4.2 s,
2026-12-01: handshake RTTs of 1.6-3.0 ms gave 2.0-3.6 MB buffers, and the path's RTT
under load is far longer than the handshake's).  An explicit -stream-buffer BYTES is
used as given; 0 leaves both ends to the kernel.
"""

from __future__ import annotations

import socket
import struct

AUTO = None  # Config.stream_buffer: size each end from its connection's RTT
SHORT_RTT = 100e-6  # seconds: the longest handshake RTT given SIZE
SIZE = 256 << 10  # bytes: measured in the one-machine lab (see above)
# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s from tcpi_rto on;
# tcpi_rtt (microseconds) is the 16th of them.
_TCPI_RTT = struct.Struct("=68xI")


def connection_rtt(sock: socket.socket) -> float | None:
    """The kernel's smoothed RTT of a connected TCP socket, in seconds (None if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_RTT.size)
    except OSError:
        return None
    if len(info) < _TCPI_RTT.size:
        return None
    (rtt_us,) = _TCPI_RTT.unpack_from(info)
    return rtt_us / 1e6 if rtt_us else None


def auto_size(rtt: float | None) -> int:
    """The buffer for a connection with this RTT; 0: leave it to the kernel."""
    return SIZE if rtt is not None and rtt <= SHORT_RTT else 0


def size_stream(sock: socket.socket, setting: int | None, option: int) -> str | None:
    """Apply -stream-buffer to one end of the connected stream (`option`: SO_SNDBUF on
    the source, SO_RCVBUF on the destination); a line for the log, or None when nothing
    was set by "auto".  An explicit size other than 0 is set here too (the destination
    also sets it on its listener, so the SYN-ACK's window scale allows it)."""
    if setting is not AUTO:
        if setting:
            sock.setsockopt(socket.SOL_SOCKET, option, setting)
        return None
    rtt = connection_rtt(sock)
    size = auto_size(rtt)
    shown = "unknown" if rtt is None else f"{rtt * 1000:.3f} ms"  # the kernel's microseconds
    which = "send" if option == socket.SO_SNDBUF else "receive"
    if not size:
        return f"RAM stream {which} buffer left to the kernel (connection RTT {shown})"
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    return f"RAM stream {which} buffer {size >> 10} KiB (connection RTT {shown})"
