"""The host side of the node agent: run `pytest_katamaran.agent.node` steps on a node over SSH.

Why a module: a pod or a migration is a sequence of node steps (start the workload, start
the destination, converge routes, look for leftovers, stop), each one JSON line back.
This module runs them and parses katamaran's stamped logs (the loss placement that puts
every lost ping relative to STOP/RESUME lives here too), so ``pod.py`` and
``migration.py`` read as the guide's steps.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_katamaran
from pytest_katamaran.agent.node import converge_route
from pytest_katamaran.checks.ping import PingStats
from pytest_katamaran.errors import NodeStepFailed
from pytest_katamaran.logtail import tail
from pytest_katamaran.ssh import RemoteProcess

STATE_DIR = "/run/katamaran-e2e"
SERIAL_TAIL_LINES = 60
# The checkout this process imports: the node sees it through the host root and must run
# the same code, whatever the interpreter's site-packages has installed.
CHECKOUT = str(Path(pytest_katamaran.__file__).resolve().parent.parent)
STAMP_RE = re.compile(r"^\[(?P<ts>\d+\.\d+)\] (?P<msg>.*)$")
SUMMARY_RE = re.compile(
    r"migration completed in (?P<total>[\d.]+) s \(downtime (?P<downtime>\d+ ms|n/a), "
    r"RAM (?P<ram>[\d.]+) MiB, storage (?P<storage>[\d.]+) MiB\)"
)


@dataclass
class NodeSide:
    """`python3 -m pytest_katamaran.agent.node` on one node, as root, parsed from JSON.

    The node runs this host's interpreter over its read-only view of the host root, so
    `sys.executable` names the same python (with this checkout importable) on the node.
    """

    node: Any
    python: str = sys.executable
    state_dir: str = STATE_DIR
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.node.name)

    def command(self, *args: str) -> str:
        base = ["env", f"PYTHONPATH={CHECKOUT}", self.python, "-m", "pytest_katamaran.agent.node"]
        base += ["--state-dir", self.state_dir]
        return shlex.join([*base, *args])

    def serial_tail(self, lines: int = SERIAL_TAIL_LINES) -> str:
        """The node's own console (kernel oopses, OOM kills) for failure messages."""
        log = getattr(self.node, "serial_log", None)
        return tail(log, lines) if log else ""

    def call(self, *args: str, timeout: float = 300.0, check: bool = True) -> dict[str, Any]:
        """Run one step; returns its JSON (raises NodeStepFailed with it if ok is false)."""
        t0 = time.monotonic()
        cmd = self.command(*args)
        res = self.node.ssh.sudo(cmd, timeout=timeout, check=False)
        elapsed = time.monotonic() - t0
        last = (res.stdout.strip().splitlines() or [""])[-1]
        try:
            data = json.loads(last)
        except ValueError:
            data = {"ok": False, "error": f"no JSON from nodeside (rc={res.rc})"}
        self.calls.append({"args": args[:1], "seconds": round(elapsed, 2), "ok": data.get("ok")})
        if check and not data.get("ok"):
            raise NodeStepFailed(self.name, cmd, data, res.stderr, self.serial_tail())
        return data

    def route_now(self, role: str, pod_ip: str, tap: str, via: str | None = None) -> float:
        """The CNI's route for the moved pod, set at once with `ip` over SSH; the node's
        clock when it was in.

        Why not the agent's `converge`: that starts Python on a TCG node (3-6 s of its
        CPU in the e2e) right when the moved guest, cold on both TCG levels, catches up,
        and the e2e's lost pings at 10 ms fell in that window.  The agent records the
        route for `stop` before the migration (`converge --record-only`).
        """
        cmd = shlex.join(["ip", "route", "replace", *converge_route(role, pod_ip, via, tap)])
        res = self.node.ssh.sudo(f"{cmd} && date +%s.%N", timeout=120, check=False)
        if res.rc != 0:
            data = {"ok": False, "error": f"{cmd}: exit {res.rc}: {res.stderr.strip()}"}
            raise NodeStepFailed(self.name, cmd, data, res.stderr, self.serial_tail())
        return float(res.stdout.split()[-1])

    def katamaran(self, *args: str) -> RemoteProcess:
        """Start the real katamaran CLI in the background, its lines stamped with node time."""
        return self.node.ssh.start(self.command("katamaran", "--", *args), sudo=True)


CLOCK_LOOP = "bash -c 'while read -r _; do echo \"$EPOCHREALTIME\"; done'"


def clock_offset(ssh: Any, samples: int = 9) -> tuple[float, float]:
    """(node clock - this host's clock, uncertainty), both in seconds.

    Why: each node stamps its own lines (STOP and the switch on the source, RESUME on
    the destination), and a TCG node's clock drifts from the host's by tens to hundreds
    of ms after boot: a timeline that mixes them can draw RESUME before STOP.  One ssh
    session runs a loop that answers each line with bash's `$EPOCHREALTIME` (no process
    started per reading: a `date` per ssh exec took 0.3 s round trips on a TCG node).
    """
    connect = getattr(ssh, "connect", None)
    if connect is None:  # a runner with no interactive session (a test double)
        raise ValueError(f"{type(ssh).__name__} opens no session to read the clock in")
    stdin, stdout, _ = connect().exec_command(CLOCK_LOOP, timeout=10)
    readings = []
    try:
        for _ in range(samples):
            t0 = time.time()
            stdin.write("\n")
            stdin.flush()
            node = float(stdout.readline())
            readings.append((t0, node, time.time()))
    finally:
        stdin.close()  # the loop ends at EOF
    return best_offset(readings)


def best_offset(readings: list[tuple[float, float, float]]) -> tuple[float, float]:
    """From (host before, node, host after) readings: the node's reading lies within its
    round trip, so the one with the shortest is kept and half of it is the uncertainty."""
    if not readings:
        raise ValueError("no clock readings")
    t0, node, t1 = min(readings, key=lambda r: r[2] - r[0])
    half = (t1 - t0) / 2
    return node - (t0 + half), half


def stamped(text: str) -> list[tuple[float, str]]:
    """(node time, message) for every stamped line of a nodeside-wrapped katamaran log."""
    out = []
    for line in text.splitlines():
        m = STAMP_RE.match(line.strip())
        if m:
            out.append((float(m.group("ts")), m.group("msg")))
    return out


def first_stamp(lines: list[tuple[float, str]], needle: str) -> float | None:
    """Node time of the first stamped line containing ``needle``."""
    for ts, msg in lines:
        if needle in msg:
            return ts
    return None


def katamaran_events(
    source_log: str, dest_log: str
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """The cutover's moments from two stamped katamaran logs: (source's, destination's).

    One mapping for the e2e's ``migrate`` and the demo, so a timeline, the loss
    placement and the hold checks read the same names.  ``mirror ready`` is None with
    shared storage (nothing is mirrored).
    """
    src, dst = stamped(source_log), stamped(dest_log)
    source = {
        "mirror ready": first_stamp(src, "storage synchronized"),
        # The divert and the tap drain come first; the switch waits for migrate-continue
        # (or, where nothing was diverted before the pause, for the STOP).
        "feed diverted": first_stamp(src, "feed diverted to katamaran"),
        # Only a real switch (not "switchover (...): pausing the VM" without a tunnel):
        # "(... of RAM left): traffic for", "VM paused: traffic for" or
        # "migrate-continue sent: traffic for".
        "tunnel switched": first_stamp(src, ": traffic for "),
        "STOP": first_stamp(src, "VM paused"),
        "completed": first_stamp(src, "migration completed in"),
        "hold start": first_stamp(src, "holding tunnel"),
    }
    dest = {
        "ready": first_stamp(dst, "destination ready"),
        "RESUME (plug released)": first_stamp(dst, "VM resumed"),
        "received": first_stamp(dst, "migration received in"),
    }
    return source, dest


def parse_summary(text: str) -> dict[str, Any] | None:
    """katamaran's `migration completed in ...` line as numbers."""
    m = SUMMARY_RE.search(text)
    if not m:
        return None
    downtime = m.group("downtime")
    return {
        "total_s": float(m.group("total")),
        "downtime_ms": None if downtime == "n/a" else int(downtime.split()[0]),
        "ram_mib": float(m.group("ram")),
        "storage_mib": float(m.group("storage")),
    }


def wait_for_line(proc: RemoteProcess, needle: str, timeout: float) -> str | None:
    """Wait for `needle` in a background katamaran's output; None when found, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.errors():
            return None
        if not proc.is_running():
            break
        time.sleep(0.1)
    if needle in proc.errors():
        return None
    return "exited" if not proc.is_running() else f"still running after {timeout:.0f}s"


def describe_logs(logs: dict[str, Any]) -> str:
    """Every katamaran log (RemoteProcess or text) as one block for failure messages."""
    parts = []
    for name, log in logs.items():
        if log is None:
            continue
        text = log.errors() + log.output() if isinstance(log, RemoteProcess) else str(log)
        parts.append(f"\n--- {name} ---\n{text.strip()[-8000:] or '(empty)'}")
    return "".join(parts)


def send_times(ping_output: str) -> dict[int, float]:
    """icmp_seq -> send time (reply timestamp minus RTT, ping -D) of every answered packet."""
    times: dict[int, float] = {}
    pattern = r"^\[(\d+\.\d+)\] \d+ bytes from .*?icmp_seq=(\d+).*? time=([\d.]+) ms"
    for m in re.finditer(pattern, ping_output, re.M):
        times.setdefault(int(m.group(2)), float(m.group(1)) - float(m.group(3)) / 1000.0)
    return times


def place_losses(
    stats: PingStats,
    ping_output: str,
    events: dict[str, float | None],
    interval: float,
) -> str:
    """Where each lost ping falls relative to katamaran's events, on the pinging node's clock.

    A lost seq's send time is the previous answered seq's send time (its reply stamp
    minus its RTT) plus one interval per seq in between.
    """
    if not stats.lost:
        return ""
    times = send_times(ping_output)
    answered = sorted(times)
    lines = ["lost pings placed on the source node's clock (send time estimated):"]
    marks = sorted((ts, name) for name, ts in events.items() if ts is not None)
    for ev_ts, ev_name in marks:
        lines.append(f"  event {ev_name}: {ev_ts:.3f}")
    ranges: list[list[int]] = []
    for seq in stats.lost:
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    for first, last in ranges[:40]:
        before = [s for s in answered if s < first]
        if not before:
            lines.append(f"  seqs {first}-{last}: before the first reply")
            continue
        prev = before[-1]
        start = times[prev] + (first - prev) * interval
        end = start + (last - first) * interval
        rel = ", ".join(f"{start - ts:+.3f}s vs {name}" for ts, name in marks)
        lines.append(f"  seqs {first}-{last}: sent ~{start:.3f}..{end:.3f} (start {rel})")
    return "\n".join(lines)
