"""`within`: asyncio.wait_for without its lost-cancellation race.

Why: on Python before 3.12, `asyncio.wait_for` returns the inner result when the caller
is cancelled at the moment the inner awaitable completes, and the cancellation is gone
(CPython gh-86296).  katamaran cancels its run when SIGINT/SIGTERM/SIGHUP arrive
(cli._run_interruptible) while the source polls QEMU every 100 ms, so a signal could
land in that window and be ignored: the fault suite saw a SIGHUP'd source keep
migrating for minutes.  `asyncio.timeout` would do, but it is 3.11+ and the core runs on
3.10 (Ubuntu 22.04 nodes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float) -> T:
    """Await `aw` for at most `timeout` s; asyncio.TimeoutError (the builtin only from
    3.11) after that.  A cancellation of the caller always propagates (and cancels
    `aw`), even when `aw` has just completed."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise asyncio.TimeoutError
    return task.result()
