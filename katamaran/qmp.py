"""A thin layer over qemu.qmp: timeouts, one-line errors, and events that are never lost.

One `EventListener` is registered before the connection is made, so every event QEMU
sends — including one that arrives while a command is in flight — lands in `history`.
Waiters scan the history from a mark, so an event that came "too early" is still seen.
`asyncio.wait_for` raises `asyncio.TimeoutError`, which is the builtin `TimeoutError` only
from Python 3.11: the core also runs on 3.10 (Ubuntu 22.04 nodes), so that is what we catch.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate, StateError

from .aio import within
from .errors import KatamaranError, QMPClosed, QMPCommandError, QMPTimeout

Event = dict[str, Any]
DROPPED = "QEMU exited or dropped the QMP socket"
_PEERCRED = (socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))

# qemu.qmp logs every disconnect at error level; our own messages say it better.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class _NotAGreeting(Exception):
    """QEMU's first message was not the QMP greeting (see Monitor.connect)."""


class Monitor:
    """A QMP connection to one QEMU, with its event history."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.history: list[Event] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.peer_pid: int | None = None  # QEMU's pid, from the socket (SO_PEERCRED)
        self._client, self._listener = self._new_client()

    def _new_client(self) -> tuple[QMPClient, EventListener]:
        client = QMPClient(f"katamaran:{self.path.name}")
        listener = EventListener()
        client.register_listener(listener)
        return client, listener

    def check_path(self) -> None:
        """The socket is there: a one-line error for a wrong -qmp, before anything else."""
        if not self.path.exists():
            raise KatamaranError(
                f"Failed to connect to QMP socket {self.path}: no such file "
                "(is the VM running? check `ls /run/vc/vm/*/qmp.sock`)"
            )
        if not self.path.is_socket():
            raise KatamaranError(f"Failed to connect to QMP socket {self.path}: not a socket")

    async def connect(self) -> None:
        """Connect and negotiate; any failure names the socket path.

        A first message that is no greeting is tried again (twice): QEMU 10 was seen
        sending a client that connected while a mirror ran something else first ("Did
        not understand Greeting"; once in a CI run), and a reconnect during a migration
        (regain) must not fail on it.
        """
        for attempt in range(3):
            try:
                return await self._connect_once()
            except _NotAGreeting:
                await self.close()
                self._client, self._listener = self._new_client()
                if attempt == 2:
                    raise KatamaranError(
                        f"Failed to connect to QMP socket {self.path}: no QMP greeting in 3 tries"
                    ) from None

    async def _connect_once(self) -> None:
        self.check_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.path))
            pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(*_PEERCRED))
            self.peer_pid = pid or None
            sock.setblocking(False)
            await within(self._client.connect(sock), self.timeout)
        except asyncio.TimeoutError:
            sock.close()
            await self._client.disconnect()
            raise KatamaranError(
                f"Failed to connect to QMP socket {self.path}: no greeting within "
                f"{self.timeout:g}s (another client may hold a single-client monitor)"
            ) from None
        except (QMPError, OSError) as err:
            sock.close()
            if "Greeting" in str(err):
                raise _NotAGreeting from None
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise KatamaranError(f"Failed to connect to QMP socket {self.path}: {reason}") from None
        self._tasks = [
            asyncio.create_task(self._pump_events()),
            asyncio.create_task(self._watch_runstate()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError):
            pass  # the peer already went away; nothing left to release

    async def regain(self) -> str | None:
        """Reconnect if the connection dropped and QEMU still answers; the line for the
        user when it did, None when nothing was lost or nothing answers (QEMU exited).

        For cleanup, which needs QMP to undo what it set up: QEMU keeps running, and
        migrating, when its QMP client goes away, and its monitor (``server=on,wait=off``,
        as Kata starts it) accepts the next client.  Without a new connection, cleanup
        could not cancel a migration that would then pause the VM in ``pre-switchover``
        for good.  Events sent in between are lost; the history keeps its positions, so
        earlier marks stay valid.
        """
        if not self.closed:
            return None
        await self.close()
        self._client, self._listener = self._new_client()
        self.closed = False
        try:
            await self.connect()
        except KatamaranError:
            self.closed = True
            return None  # QEMU is gone: each cleanup step says so
        return f"QMP connection to {self.path} was lost; reconnected"

    async def _pump_events(self) -> None:
        async for event in self._listener:
            self.history.append(dict(event))
            self._changed.set()

    async def _watch_runstate(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        self.closed = True
        self._changed.set()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; errors become QMPTimeout / QMPClosed / QMPCommandError."""
        if self.closed:
            raise QMPClosed(f"{command}: connection is closed ({DROPPED})")
        try:
            return await within(self._client.execute(command, arguments), timeout=self.timeout)
        except asyncio.TimeoutError:
            raise QMPTimeout(
                f"timed out waiting for QMP response to {command} after {self.timeout:g}s"
            ) from None
        except ExecuteError as err:
            raise QMPCommandError(command, err.error_class, str(err)) from None
        except StateError:  # its text is qemu.qmp's advice to its caller, not news to users
            self.closed = True
            raise QMPClosed(f"{command}: connection is closed ({DROPPED})") from None
        except (ExecInterruptedError, EOFError, ConnectionError) as err:
            self.closed = True
            raise QMPClosed(f"{command}: connection is closed ({err or DROPPED})") from None

    async def send_socket(self, name: str, sock: socket.socket) -> None:
        """Hand a connected socket to QEMU as a named fd (`getfd`), for `fd:` URIs."""
        if self.closed:
            raise QMPClosed(f"getfd: connection is closed ({DROPPED})")
        self._client.send_fd_scm(sock.fileno())
        await self.execute("getfd", {"fdname": name})

    def mark(self) -> int:
        """A position in the event history; wait_event(since=mark) sees what came after."""
        return len(self.history)

    async def next_event(
        self, match: Callable[[Event], bool], since: int, timeout: float
    ) -> tuple[int, Event] | None:
        """(position after it, event) for the first match at/after `since`; None on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = since
        while True:
            while index < len(self.history):
                event = self.history[index]
                index += 1
                if match(event):
                    return index, event
            if self.closed:
                raise QMPClosed(f"connection is closed ({DROPPED})")
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await within(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def wait_event(
        self, match: Callable[[Event], bool], timeout: float, since: int = 0
    ) -> Event:
        """The first matching event at/after `since`; TimeoutError after `timeout`."""
        found = await self.next_event(match, since, timeout)
        if found is None:
            raise TimeoutError
        return found[1]


def named(names: str | Iterable[str], **data: Any) -> Callable[[Event], bool]:
    """An event matcher: event name in `names` and every key of `data` equal in its data."""
    wanted = {names} if isinstance(names, str) else set(names)

    def match(event: Event) -> bool:
        if event.get("event") not in wanted:
            return False
        payload = event.get("data", {})
        return all(payload.get(key) == value for key, value in data.items())

    return match


def migration_status(*states: str) -> Callable[[Event], bool]:
    """Matches a MIGRATION event whose status is one of `states`."""

    def match(event: Event) -> bool:
        return event.get("event") == "MIGRATION" and event.get("data", {}).get("status") in states

    return match
