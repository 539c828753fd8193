"""procnet: the one LISTEN-socket reader (node boot, qemu-nbd export, node agent leftovers)."""

from __future__ import annotations

import socket

from pytest_katamaran.net.listening import is_listening, listening

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2A31 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:115C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:2A31 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


def test_listening_parses_only_listen_state():
    assert listening(PROC_NET_TCP) == [("0100007F", 10801), ("00000000", 4444)]
    assert listening("header only\n") == []


def test_is_listening_sees_a_real_loopback_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not is_listening(port)  # bound is not listening
        s.listen()
        assert is_listening(port)
    assert not is_listening(port)
