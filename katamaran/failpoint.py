"""Failpoints: named places where katamaran stops itself, so a test can place a fault
exactly there.

Why.  Some states last a few milliseconds and matter most: at the switchover gate the
VM runs, its tap's feed is diverted and its packets are kept by katamaran, and QEMU
waits only until katamaran opens the gate (see gate).  A test that freezes katamaran on
a printed line races the next step; a QMP relay to hold a command would become the
monitor's peer and hide QEMU's taps from katamaran.  Stopping at a named point is
deterministic, as etcd's gofail and FreeBSD's fail points are.

How.  `KATAMARAN_FAILPOINTS` names points, comma-separated.  At a named point
katamaran says so on stderr and sends itself SIGSTOP: every thread stops until
SIGCONT.  A test waits for the stopped state (`/proc/<pid>/stat`), places its fault (a
signal stays pending until SIGCONT; QEMU can be killed meanwhile), then sends SIGCONT.
Unset (every real run), `hit` compares one string and returns.

Points:
  gate-held     source: the tap's feed diverted and drained, the VM running, its packets
                kept, QEMU still held at the switchover gate (Source._hold_at_gate).
  paused        source: QEMU has paused the VM; its tap's feed diverted, its packets
                kept by katamaran, nothing tunnelled yet, `migrate-continue` not sent
                (Source._take_tap_now, where the switch waits for the commit).
  switched      source: the VM's traffic has just gone into the tunnel: right after
                `migrate-continue` where the packets were kept to the commit, else at
                the STOP, `migrate-continue` not sent (Source._switch).
  dest-resumed  destination: the VM has just resumed there, nothing released or
                announced yet (Dest._after_resume).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "KATAMARAN_FAILPOINTS"
POINTS = ("gate-held", "paused", "switched", "dest-resumed")


def armed(name: str) -> bool:
    """Whether the environment names failpoint `name`."""
    return name in os.environ.get(ENV, "").split(",")


def hit(name: str, say: Callable[[str], None]) -> None:
    """Stop this process here (SIGSTOP) if failpoint `name` is armed; `say` tells where."""
    assert name in POINTS, name
    if armed(name):
        say(f"failpoint {name}: stopped (SIGSTOP) until SIGCONT")
        os.kill(os.getpid(), signal.SIGSTOP)
