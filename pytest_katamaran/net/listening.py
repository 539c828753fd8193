"""Listening TCP sockets read from ``/proc/net/tcp{,6}``: the one "is it listening" reader.

Why /proc and not a probe connection: a probe would count as a client (QEMU's socket
netdev takes it for its peer, qemu-nbd for an NBD client).  Standard library only: the
node agent uses it on TCG nodes.
"""

from __future__ import annotations

from pathlib import Path

LISTEN = "0A"
LOOPBACK_OR_ANY = ("0100007F", "00000000")  # 127.0.0.1, 0.0.0.0 as /proc writes them


def listening(text: str) -> list[tuple[str, int]]:
    """(local address as hex, port) of every LISTEN socket in a /proc/net/tcp{,6} text."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == LISTEN:
            addr, port = fields[1].rsplit(":", 1)
            found.append((addr, int(port, 16)))
    return found


def is_listening(port: int) -> bool:
    """A LISTEN socket on 127.0.0.1/0.0.0.0:``port`` in this network namespace."""
    try:
        text = Path("/proc/net/tcp").read_text()
    except OSError:
        return False
    return any(p == port and a in LOOPBACK_OR_ANY for a, p in listening(text))
