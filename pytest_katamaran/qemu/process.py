"""Starting a QEMU process the one way the harness does it.

Why one function: a node VM and a workload sandbox are launched alike (own session, so a
Ctrl-C aimed at pytest does not reach QEMU and pytest's cleanup stops it by PID; output
and stderr into one log for failure messages; no stdin).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


def start_qemu(
    argv: Sequence[str], log: Path, preexec_fn: Callable[[], None] | None = None
) -> subprocess.Popen:
    """QEMU ``argv`` in a new session, stdout and stderr appended to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
            start_new_session=True,
        )
