"""QMP connect against a real unix socket that behaves like a monitor (not in the CPython
3.10 logic run: pyodide has no AF_UNIX)."""

from __future__ import annotations

import asyncio
import socket
import threading

from katamaran.qmp import Monitor


def test_connect_tries_again_when_the_first_message_is_no_greeting(tmp_path):
    """QEMU 10 once sent a new client something else first: the next try connects."""
    path = tmp_path / "q.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    greeting = (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, '
        b'"package": ""}, "capabilities": []}}\r\n'
    )
    event = (
        b'{"event": "JOB_STATUS_CHANGE", "data": {}, '
        b'"timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
    )
    conns = []

    def serve() -> None:
        for first in (event, greeting):
            conn, _ = srv.accept()
            conns.append(conn)
            conn.sendall(first)
            if first is greeting:
                conn.recv(4096)  # qmp_capabilities
                conn.sendall(b'{"return": {}}\r\n')

    threading.Thread(target=serve, daemon=True).start()

    async def connect() -> int:
        mon = Monitor(path, timeout=5)
        await mon.connect()
        await mon.close()
        return len(conns)

    try:
        assert asyncio.run(connect()) == 2
    finally:
        srv.close()
        for conn in conns:
            conn.close()
