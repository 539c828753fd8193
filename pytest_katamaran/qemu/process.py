"""Starting a QEMU process the one way the harness does it.

Why one function: a node VM and a workload sandbox are launched alike (own session, so a
Ctrl-C aimed at pytest does not reach QEMU and pytest's cleanup stops it by PID; output
and stderr into one log for failure messages; no stdin).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies.

    A QEMU in its own session outlives a SIGKILLed test run (pytester's timeout, a CI
    job killed); a spinning KVM probe or an orphaned sandbox would then run for ever.
    """
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


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
