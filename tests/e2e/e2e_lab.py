"""Host-side helpers of the two-node e2e test: drive `pytest_katamaran.nodeside` over SSH.

Why a module: the test reads as the guide's steps (start workload, start destination,
migrate, converge, check); the plumbing (JSON calls, timestamped katamaran logs, the
loss analysis that places every lost ping relative to STOP/RESUME) lives here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pytest_katamaran.ping import PingStats
from pytest_katamaran.ssh import RemoteProcess

STATE_DIR = "/run/katamaran-e2e"
STAMP_RE = re.compile(r"^\[(?P<ts>\d+\.\d+)\] (?P<msg>.*)$")
SUMMARY_RE = re.compile(
    r"migration completed in (?P<total>[\d.]+) s \(downtime (?P<downtime>\d+ ms|n/a), "
    r"RAM (?P<ram>[\d.]+) MiB, storage (?P<storage>[\d.]+) MiB\)"
)


class NodesideFailed(AssertionError):
    """A nodeside step reported ok=false (its JSON is attached)."""


@dataclass
class NodeSide:
    """`python3 -m pytest_katamaran.nodeside` on one node, as root, parsed from JSON.

    The node runs this host's interpreter over its read-only view of the host root, so
    `sys.executable` names the same python (with this checkout installed) on the node.
    """

    node: Any
    python: str = sys.executable
    state_dir: str = STATE_DIR
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.node.name)

    def command(self, *args: str) -> str:
        base = [self.python, "-m", "pytest_katamaran.nodeside", "--state-dir", self.state_dir]
        return shlex.join([*base, *args])

    def call(self, *args: str, timeout: float = 300.0, check: bool = True) -> dict[str, Any]:
        """Run one step; returns its JSON (raises NodesideFailed with it if ok is false)."""
        t0 = time.monotonic()
        res = self.node.ssh.sudo(self.command(*args), timeout=timeout, check=False)
        elapsed = time.monotonic() - t0
        last = (res.stdout.strip().splitlines() or [""])[-1]
        try:
            data = json.loads(last)
        except ValueError:
            data = {"ok": False, "error": f"no JSON from nodeside (rc={res.rc})"}
        self.calls.append({"args": args[:1], "seconds": round(elapsed, 2), "ok": data.get("ok")})
        if check and not data.get("ok"):
            raise NodesideFailed(
                f"{self.name}: nodeside {args[0]} failed: {data.get('error')}\n"
                f"{json.dumps({k: v for k, v in data.items() if k != 'error'}, indent=1)[:6000]}"
                f"\nstderr: {res.stderr[-3000:]}"
            )
        return data

    def katamaran(self, *args: str) -> RemoteProcess:
        """Start the real katamaran CLI in the background, its lines stamped with node time."""
        return self.node.ssh.start(self.command("katamaran", "--", *args), sudo=True)


def stamped(text: str) -> list[tuple[float, str]]:
    """(node time, message) for every stamped line of a nodeside-wrapped katamaran log."""
    out = []
    for line in text.splitlines():
        m = STAMP_RE.match(line.strip())
        if m:
            out.append((float(m.group("ts")), m.group("msg")))
    return out


def first_stamp(lines: list[tuple[float, str]], needle: str) -> float | None:
    for ts, msg in lines:
        if needle in msg:
            return ts
    return None


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


def wait_for_line(
    proc: RemoteProcess, needle: str, timeout: float, what: str, peers: dict[str, Any]
) -> None:
    """Wait for `needle` in a background katamaran's output; fail early if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in proc.errors():
            return
        if not proc.is_running():
            break
        time.sleep(0.1)
    state = "exited" if not proc.is_running() else f"still running after {timeout:.0f}s"
    raise AssertionError(f"{what}: no {needle!r} ({state})" + describe_logs(peers))


def describe_logs(logs: dict[str, Any]) -> str:
    """Every katamaran log (RemoteProcess or text) as one block for assertion messages."""
    parts = []
    for name, log in logs.items():
        if log is None:
            continue
        text = log.errors() + log.output() if isinstance(log, RemoteProcess) else str(log)
        parts.append(f"\n--- {name} ---\n{text.strip()[-8000:] or '(empty)'}")
    return "".join(parts)


def reply_times(ping_output: str) -> dict[int, float]:
    """icmp_seq -> reply timestamp (ping -D) for every answered packet (no wrap handling)."""
    times: dict[int, float] = {}
    for m in re.finditer(r"^\[(\d+\.\d+)\] \d+ bytes from .*?icmp_seq=(\d+)", ping_output, re.M):
        times.setdefault(int(m.group(2)), float(m.group(1)))
    return times


def place_losses(
    stats: PingStats,
    ping_output: str,
    events: dict[str, float | None],
    interval: float,
) -> str:
    """Where each lost ping falls relative to katamaran's events, on node A's clock.

    A lost seq's send time is estimated from the previous answered seq's reply time
    (ping sends every `interval`); the RTT is far below the interval before the cutover.
    """
    if not stats.lost:
        return ""
    times = reply_times(ping_output)
    answered = sorted(times)
    lines = ["lost pings placed on node A's clock (send time estimated):"]
    marks = sorted((ts, name) for name, ts in events.items() if ts is not None)
    for ev_ts, ev_name in marks:
        lines.append(f"  event {ev_name}: {ev_ts:.3f}")
    for seq in stats.lost[:40]:
        before = [s for s in answered if s < seq]
        if not before:
            lines.append(f"  seq {seq}: before the first reply")
            continue
        prev = before[-1]
        est = times[prev] + (seq - prev) * interval
        rel = ", ".join(f"{est - ts:+.3f}s vs {name}" for ts, name in marks)
        lines.append(f"  seq {seq}: sent ~{est:.3f} ({rel})")
    if len(stats.lost) > 40:
        lines.append(f"  ... {len(stats.lost) - 40} more")
    return "\n".join(lines)


def env_float(name: str, default: float) -> float:
    """A tunable of the e2e suite (environment: suite-local CLI options would need a rootdir
    conftest)."""
    value = os.environ.get(name)
    return float(value) if value else default
