"""Continuous ICMP ping (iputils) on a node or locally, parsed into zero-drop evidence.

The proof that a migration dropped nothing is a real ``ping -D -O -i <interval>``
running across the cutover.  Its per-reply lines carry sequence numbers and
receive timestamps, so losses, duplicates, reordering and the longest silence are
computed from them; the final summary is only used as a cross-check.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

DEFAULT_INTERVAL = 0.01
# iputils refuses intervals below this for unprivileged users (older releases: 0.2 s).
UNPRIVILEGED_MIN_INTERVAL = 0.2
SEQ_MODULO = 1 << 16
# ping's socket receive buffer once started (SO_RCVBUFFORCE; the kernel doubles it).
# Why: iputils sets 64 KiB (128 KiB of skb truesize, ~170 replies).  When a stalled VM
# answers its backlog at once, the replies reach the pinging node and die in ping's own
# socket before ping reads them: a node's stall of 12 s at 10 ms lost 180 and 499 pings
# with every one counted in the ICMP socket's drops, and none with this buffer.
PING_RCVBUF = 16 << 20
# Run as root beside ping (argv: pid, bytes): every socket of that process gets the
# buffer, through a duplicate of its fd (pidfd_getfd(2)); prints `fd bytes` per socket.
WIDEN_PY = """
import ctypes, os, sys
pid, size = int(sys.argv[1]), int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
want = ctypes.c_int(size)
for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
    if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
        continue
    fd = libc.syscall(438, pidfd, int(name), 0)  # pidfd_getfd
    if fd < 0 or libc.setsockopt(fd, 1, 33, ctypes.byref(want), 4) != 0:  # SO_RCVBUFFORCE
        sys.exit(f"socket fd {name} of pid {pid}: {os.strerror(ctypes.get_errno())}")
    got, size_of = ctypes.c_int(0), ctypes.c_uint(4)
    libc.getsockopt(fd, 1, 8, ctypes.byref(got), ctypes.byref(size_of))  # SO_RCVBUF
    os.close(fd)
    print(name, got.value)
"""

_TS = r"(?:\[(?P<ts>\d+(?:\.\d+)?)\]\s+)?"
REPLY_RE = re.compile(
    _TS + r"(?P<bytes>\d+) bytes from (?P<src>.+?): icmp_seq=(?P<seq>\d+)"
    r"(?: ttl=(?P<ttl>\d+))?(?: time[=<](?P<time>[\d.]+) ms)?(?P<rest>.*)$"
)
NO_ANSWER_RE = re.compile(_TS + r"no answer yet for icmp_seq=(?P<seq>\d+)")
ERROR_RE = re.compile(_TS + r"From (?P<src>\S+)(?: \(\S+\))? icmp_seq=(?P<seq>\d+) (?P<msg>.*)$")
HEADER_RE = re.compile(r"^PING (?P<target>\S+) ")
SUMMARY_RE = re.compile(
    r"(?P<tx>\d+) packets transmitted, (?P<rx>\d+) (?:packets )?received"
    r"(?:, \+(?P<dup>\d+) duplicates)?(?:, \+(?P<err>\d+) errors)?"
    r"(?:, (?P<loss>[\d.]+)% packet loss)?"
)
RTT_RE = re.compile(r"(?:rtt|round-trip) min/avg/max(?:/mdev)? = (?P<vals>[\d./]+) ms")
USAGE_HINTS = ("invalid option", "unrecognized option", "usage:", "Usage:", "BusyBox")


class ProcessHandle(Protocol):
    """A running command whose stdout can be read while it runs and that can be signalled.

    Implemented by :class:`LocalProcess` and by ``ssh.RemoteProcess``.
    """

    def output(self) -> str:
        """Stdout produced so far."""
        ...

    def errors(self) -> str:
        """Stderr produced so far."""
        ...

    def signal(self, sig: int) -> None:
        """Deliver ``sig`` to the command."""
        ...

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code, or None if still running after ``timeout``."""
        ...

    def is_running(self) -> bool:
        """Whether the command has not exited yet."""
        ...


class Runner(Protocol):
    """Anything that can start a background command (an SSH client, a local shell)."""

    def start(self, cmd: str, *, sudo: bool = False) -> ProcessHandle:
        """Start ``cmd`` (one simple command, shell-quoted) in the background."""
        ...


# --------------------------------------------------------------------------- parsing


@dataclass
class PingStats:
    """What a ping run proved; ``lost`` is the list of sequence numbers never answered."""

    target: str | None
    sent: int
    received: int
    lost: list[int]
    duplicates: int
    reordered: int
    errors: int = 0
    in_flight: list[int] = field(default_factory=list)
    longest_gap_s: float | None = None
    longest_gap_after_seq: int | None = None
    rtt_min_ms: float | None = None
    rtt_avg_ms: float | None = None
    rtt_max_ms: float | None = None
    first_reply_ts: float | None = None
    last_reply_ts: float | None = None
    highest_reply_seq: int = 0
    interval: float | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # seq -> (receive stamp, RTT ms) of each first reply: what a timeline draws per packet.
    # Not in as_dict(): the raw ping log kept next to the results JSON carries it.
    replies: dict[int, tuple[float | None, float | None]] = field(default_factory=dict, repr=False)

    @property
    def lost_count(self) -> int:
        """Number of missing sequence numbers (excluding the in-flight tail)."""
        return len(self.lost)

    @property
    def answer_rate(self) -> float | None:
        """Share of the pings sent that were answered (1.0: every one)."""
        return round(self.received / self.sent, 4) if self.sent else None

    @property
    def replies_per_s(self) -> float | None:
        """Replies per second between the first and the last reply: what the target kept up."""
        if self.first_reply_ts is None or self.last_reply_ts is None:
            return None
        span = self.last_reply_ts - self.first_reply_ts
        return round((self.received - 1) / span, 2) if span > 0 and self.received > 1 else None

    def lost_ranges(self) -> str:
        """Compact rendering of lost seqs, e.g. ``501-503, 700``."""
        return format_seq_ranges(self.lost)

    def describe(self) -> str:
        """One line with every figure, used in assertion messages and logs."""
        lost = f"lost {self.lost_count} of {self.sent}"
        if self.lost:
            lost += f" (seqs {self.lost_ranges()})"
        gap = "n/a" if self.longest_gap_s is None else f"{self.longest_gap_s:.2f} s"
        parts = [
            lost,
            f"{self.duplicates} dup",
            f"{self.reordered} reordered",
            f"longest gap {gap}",
        ]
        if self.rtt_max_ms is not None:
            parts.append(f"rtt max {self.rtt_max_ms:.2f} ms")
        if self.errors:
            parts.append(f"{self.errors} ICMP errors")
        if self.in_flight:
            parts.append(f"{len(self.in_flight)} in flight at stop")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for the ``results`` fixture."""
        return {
            "target": self.target,
            "sent": self.sent,
            "received": self.received,
            "lost_count": self.lost_count,
            "lost": list(self.lost),
            "lost_ranges": self.lost_ranges(),
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "errors": self.errors,
            "in_flight": list(self.in_flight),
            "longest_gap_s": self.longest_gap_s,
            "longest_gap_after_seq": self.longest_gap_after_seq,
            "rtt_min_ms": self.rtt_min_ms,
            "rtt_avg_ms": self.rtt_avg_ms,
            "rtt_max_ms": self.rtt_max_ms,
            "first_reply_ts": self.first_reply_ts,
            "last_reply_ts": self.last_reply_ts,
            "interval": self.interval,
            "answer_rate": self.answer_rate,
            "replies_per_s": self.replies_per_s,
            "summary": self.summary,
            "notes": list(self.notes),
            "description": self.describe(),
        }


def format_seq_ranges(seqs: Iterable[int]) -> str:
    """Render sorted seqs as ranges so 1000 lost packets stay readable."""
    ordered = sorted(set(seqs))
    out: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(out)


def _unwrap(raw: int, reference: int) -> int:
    """Map a 16-bit icmp_seq to the unbounded sequence closest to ``reference``.

    iputils wraps icmp_seq at 65536 (about 11 minutes at 10 ms), which would
    otherwise look like massive reordering.
    """
    base = reference - (reference % SEQ_MODULO)
    candidates = (base - SEQ_MODULO + raw, base + raw, base + SEQ_MODULO + raw)
    return min(candidates, key=lambda c: (abs(c - reference), c))


def parse_ping_output(text: str, interval: float | None = None) -> PingStats:
    """Parse iputils ``ping -D -O`` output into :class:`PingStats`.

    ``interval`` (seconds) bounds how many trailing unanswered packets may be
    counted as merely in flight when ping was interrupted: at most
    ``max(1, ceil(rtt_max / interval))``, i.e. those sent within one worst-case
    RTT of the stop.  Anything older than that is lost.
    """
    target: str | None = None
    received: set[int] = set()
    duplicates = 0
    reordered = 0
    errors = 0
    highest = 0  # highest unwrapped seq seen in any line
    highest_reply = 0
    reference = 0
    rtts: list[float] = []
    prev_ts: float | None = None
    prev_seq: int | None = None
    longest_gap: float | None = None
    gap_after: int | None = None
    first_ts: float | None = None
    last_ts: float | None = None
    summary: dict[str, Any] | None = None
    notes: list[str] = []
    replies: dict[int, tuple[float | None, float | None]] = {}

    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if target is None and (m := HEADER_RE.match(line)):
            target = m.group("target")
            continue
        if m := REPLY_RE.match(line):
            seq = _unwrap(int(m.group("seq")), reference)
            reference = max(reference, seq)
            highest = max(highest, seq)
            is_dup = "(DUP!)" in m.group("rest") or seq in received
            if is_dup:
                duplicates += 1
                continue
            if seq < highest_reply:
                reordered += 1
            highest_reply = max(highest_reply, seq)
            received.add(seq)
            rtt = None if m.group("time") is None else float(m.group("time"))
            stamp = None if m.group("ts") is None else float(m.group("ts"))
            replies[seq] = (stamp, rtt)
            if rtt is not None:
                rtts.append(rtt)
            if stamp is not None:
                ts = stamp
                if first_ts is None:
                    first_ts = ts
                last_ts = ts
                if prev_ts is not None:
                    gap = ts - prev_ts
                    if longest_gap is None or gap > longest_gap:
                        longest_gap, gap_after = gap, prev_seq
                prev_ts, prev_seq = ts, seq
            continue
        if m := NO_ANSWER_RE.match(line):
            seq = _unwrap(int(m.group("seq")), reference)
            reference = max(reference, seq)
            highest = max(highest, seq)
            continue
        if m := ERROR_RE.match(line):
            seq = _unwrap(int(m.group("seq")), reference)
            reference = max(reference, seq)
            highest = max(highest, seq)
            errors += 1
            continue
        if m := SUMMARY_RE.search(line):
            summary = {
                "transmitted": int(m.group("tx")),
                "received": int(m.group("rx")),
                "duplicates": int(m.group("dup") or 0),
                "errors": int(m.group("err") or 0),
                "loss_pct": float(m.group("loss")) if m.group("loss") else None,
            }
            continue
        if m := RTT_RE.search(line):
            vals = [float(v) for v in m.group("vals").split("/")]
            if summary is None:
                summary = {}
            summary["rtt_ms"] = dict(zip(("min", "avg", "max", "mdev"), vals, strict=False))
            continue

    sent = highest
    if summary and "transmitted" in summary:
        if summary["transmitted"] < highest:
            notes.append(
                f"summary says {summary['transmitted']} transmitted but seq {highest} was seen"
            )
        sent = max(highest, summary["transmitted"])
    elif text.strip():
        notes.append("no final summary (ping did not exit via SIGINT or output was cut)")

    missing = [s for s in range(1, sent + 1) if s not in received]
    in_flight: list[int] = []
    tail = [s for s in missing if s > highest_reply]  # everything after the last reply
    if tail:
        rtt_max_s = (max(rtts) / 1000.0) if rtts else 0.0
        allowance = 1  # the packet sent just before the stop
        if interval and interval > 0:
            allowance = max(1, math.ceil(rtt_max_s / interval))
        in_flight = tail[-allowance:]
        missing = missing[: len(missing) - len(in_flight)]

    if summary and "transmitted" in summary and "received" in summary:
        if summary["received"] != len(received):
            notes.append(
                f"summary says {summary['received']} received, reply lines show {len(received)}"
            )
        summary_lost = summary["transmitted"] - summary["received"]
        if summary_lost > len(missing) + len(in_flight):
            notes.append(
                f"summary reports {summary_lost} lost but only "
                f"{len(missing) + len(in_flight)} missing seqs were seen"
            )

    return PingStats(
        target=target,
        sent=sent,
        received=len(received),
        lost=missing,
        duplicates=duplicates,
        reordered=reordered,
        errors=errors,
        in_flight=in_flight,
        longest_gap_s=None if longest_gap is None else round(longest_gap, 6),
        longest_gap_after_seq=gap_after,
        rtt_min_ms=min(rtts) if rtts else None,
        rtt_avg_ms=round(sum(rtts) / len(rtts), 3) if rtts else None,
        rtt_max_ms=max(rtts) if rtts else None,
        first_reply_ts=first_ts,
        last_reply_ts=last_ts,
        highest_reply_seq=highest_reply,
        interval=interval,
        summary=summary,
        notes=notes,
        replies=replies,
    )


def assert_zero_drop(stats: PingStats, *, max_gap_s: float | None = None) -> None:
    """Fail unless every sent packet was answered (the zero-drop claim).

    Also fails when nothing was exchanged at all, when the summary admits more
    loss than the reply lines show (output was lost, so the proof is void), and,
    if ``max_gap_s`` is given, when replies stopped for longer than that.
    """
    problems: list[str] = []
    if stats.sent == 0:
        problems.append("no packet was sent")
    elif stats.received == 0:
        problems.append("no reply was received")
    if stats.lost:
        problems.append("packets were lost")
    if stats.summary and "transmitted" in stats.summary and "received" in stats.summary:
        summary_lost = stats.summary["transmitted"] - stats.summary["received"]
        if summary_lost > stats.lost_count + len(stats.in_flight):
            problems.append(f"ping's own summary reports {summary_lost} lost")
    if max_gap_s is not None and stats.longest_gap_s is not None:
        if stats.longest_gap_s > max_gap_s:
            problems.append(f"longest gap exceeds {max_gap_s:.2f} s")
    if problems:
        target = f" to {stats.target}" if stats.target else ""
        raise AssertionError(f"ping{target}: {stats.describe()} ({'; '.join(problems)})")


def answers_command(target: str, count: int = 5, deadline_s: int = 30) -> str:
    """A short ping that waits up to ``deadline_s`` for ``count`` answers, late ones too.

    ``-w`` and not ``-W``: once a reply has come, iputils waits only two of the
    slowest RTTs for the last one, so a guest that answered its first ping in
    165 ms and its fifth in 400 ms (a slow TCG guest; CI, 2026-12-02) was reported
    as not answering.  With a deadline ping keeps sending until ``count`` answers
    arrive, so a lost one shows as a sequence number that never got a reply.
    """
    return f"ping -c {count} -i 0.2 -w {deadline_s} -n {target}"


def unanswered(text: str, count: int = 5) -> list[int]:
    """Sequence numbers 1..``count`` that got no reply in ``ping``'s output."""
    answered = parse_ping_output(text).replies
    return [seq for seq in range(1, count + 1) if seq not in answered]


# --------------------------------------------------------------------------- running


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class LocalProcess:
    """A local background command whose output goes to a temp file (no pipe to fill).

    The files go when :meth:`cleanup` is called, else when the object is collected or
    the interpreter exits (weakref.finalize): a test that fails before it stops its
    process must not leave them in /tmp."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        fd, name = tempfile.mkstemp(prefix="katamaran-ping-", suffix=".out")
        os.close(fd)
        self._out_path = Path(name)
        self._err_path = self._out_path.with_suffix(".err")
        self._files = weakref.finalize(self, _unlink, self._out_path, self._err_path)
        with open(self._out_path, "wb") as out, open(self._err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        self.pid = self.proc.pid

    def output(self) -> str:
        """Stdout so far."""
        return self._out_path.read_text(errors="replace")

    def errors(self) -> str:
        """Stderr so far."""
        return self._err_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        """Signal by PID; a process that already exited is not an error."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code or None if still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def is_running(self) -> bool:
        """Whether the process is still alive."""
        return self.proc.poll() is None

    def cleanup(self) -> None:
        """Remove the temp files once output has been consumed."""
        self._files()


class LocalRunner:
    """Runs commands on this host, optionally inside a network namespace."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def start(self, cmd: str, *, sudo: bool = False) -> LocalProcess:
        """Start ``cmd`` without a shell so the PID we signal is the command's own."""
        argv = shlex.split(cmd)
        if self.netns:
            # `ip netns exec` execs the command in place: the PID stays the same.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        if sudo and os.geteuid() != 0:
            argv = ["sudo", "-n", *argv]
        return LocalProcess(argv)


def ping_command(target: str, interval: float, extra_args: Sequence[str] = ()) -> str:
    """The exact iputils invocation: timestamps (-D), report no-answer (-O), numeric (-n)."""
    return shlex.join(
        ["ping", "-D", "-O", "-n", "-i", _fmt_interval(interval), *extra_args, target]
    )


def _fmt_interval(interval: float) -> str:
    return f"{interval:.6f}".rstrip("0").rstrip(".")


class PingMonitor:
    """A continuous ping running in the background until :meth:`stop`."""

    def __init__(
        self,
        runner: Runner,
        target: str,
        interval: float = DEFAULT_INTERVAL,
        *,
        name: str | None = None,
        sudo: bool | None = None,
        extra_args: Sequence[str] = (),
        rcvbuf: int | None = PING_RCVBUF,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"ping interval must be positive, got {interval}")
        self.runner = runner
        self.target = target
        self.interval = interval
        self.name = name or f"ping {target}"
        self.sudo = interval < UNPRIVILEGED_MIN_INTERVAL if sudo is None else sudo
        self.command = ping_command(target, interval, extra_args)
        self.handle: ProcessHandle | None = None
        self.want_rcvbuf = rcvbuf  # None: leave ping's own (64 KiB)
        self.rcvbuf: int | None = None  # ping's socket receive buffer, once widened
        self.setup_notes: list[str] = []  # how the witness was set up, into the stats
        self.stats: PingStats | None = None
        self.exit_code: int | None = None
        self._final_output: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def local(
        cls,
        target: str,
        interval: float = DEFAULT_INTERVAL,
        *,
        netns: str | None = None,
        extra_args: Sequence[str] = (),
        rcvbuf: int | None = PING_RCVBUF,
    ) -> PingMonitor:
        """A monitor pinging from this host (or from network namespace ``netns``);
        ``extra_args`` go to ping (e.g. ``-s 1400``)."""
        where = f" (netns {netns})" if netns else ""
        return cls(
            LocalRunner(netns),
            target,
            interval,
            name=f"ping {target}{where}",
            extra_args=extra_args,
            rcvbuf=rcvbuf,
        )

    @classmethod
    def on_node(cls, node: Any, target: str, interval: float = DEFAULT_INTERVAL) -> PingMonitor:
        """A monitor pinging from ``node`` over its SSH connection."""
        name = getattr(node, "name", "node")
        return cls(node.ssh, target, interval, name=f"ping {target} from {name}")

    def start(self, ready_timeout: float = 10.0) -> PingMonitor:
        """Start ping and wait for its header line so a bad setup fails here, not at stop."""
        if self.handle is not None:
            raise RuntimeError(f"{self.name}: already started")
        self.handle = self.runner.start(self.command, sudo=self.sudo)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if HEADER_RE.search(self.handle.output()) or REPLY_RE.search(self.handle.output()):
                self._widen_receive_buffer()
                return self
            if not self.handle.is_running():
                break
            time.sleep(0.02)
        out, err = self.handle.output(), self.handle.errors()
        if self.handle.is_running():
            self.handle.signal(signal.SIGKILL)
            raise RuntimeError(
                f"{self.name}: no output within {ready_timeout:.0f}s of `{self.command}`"
                f"; stderr: {err.strip()[-500:]!r}"
            )
        hint = ""
        if any(h in out + err for h in USAGE_HINTS):
            hint = " (needs iputils ping with -D and -O, not busybox)"
        raise RuntimeError(
            f"{self.name}: `{self.command}` exited early{hint}; "
            f"stdout: {out.strip()[-500:]!r}; stderr: {err.strip()[-500:]!r}"
        )

    def _widen_receive_buffer(self) -> None:
        """Give ping's socket PING_RCVBUF (see there), beside it: on this host, or over
        the node's SSH.  A witness that cannot be widened says so in its notes (its
        socket's drops then show in the migration's drop counters)."""
        if self.want_rcvbuf is None:
            return
        pid = getattr(self.handle, "pid", None)
        if not isinstance(pid, int) or pid <= 0:
            self.setup_notes.append("receive buffer left at ping's own (its pid is unknown)")
            return
        args = [str(pid), str(self.want_rcvbuf)]
        sudo = getattr(self.runner, "sudo", None)
        if sudo is not None:  # a node: its python3, as root
            res = sudo(shlex.join(["python3", "-c", WIDEN_PY, *args]), check=False)
            rc, out, err = res.rc, res.stdout, res.stderr
        else:
            argv = [sys.executable, "-c", WIDEN_PY, *args]
            if os.geteuid() != 0:
                argv = ["sudo", "-n", *argv]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            rc, out, err = done.returncode, done.stdout, done.stderr
        sizes = [int(line.split()[1]) for line in out.splitlines() if len(line.split()) == 2]
        if rc != 0 or not sizes:
            why = (err.strip().splitlines() or [f"exit {rc}"])[-1]
            self.setup_notes.append(f"receive buffer left at ping's own: {why}")
            return
        self.rcvbuf = min(sizes)

    @property
    def running(self) -> bool:
        """Whether ping is still running."""
        return self.handle is not None and self.handle.is_running()

    def output(self) -> str:
        """Raw ping output so far (for logs and results)."""
        if self._final_output is not None:
            return self._final_output
        return self.handle.output() if self.handle else ""

    def snapshot(self) -> PingStats:
        """Stats from the output so far, without stopping (no summary yet)."""
        return parse_ping_output(self.output(), self.interval)

    def wait_caught_up(self, timeout: float, lag: float = 1.0) -> bool:
        """Wait until replies trail sends by at most `lag` s (a slow guest's backlog
        answered), so stopping does not cut off packets that were merely queued."""
        deadline = time.monotonic() + timeout
        behind = max(1, math.ceil(lag / self.interval))
        while True:
            snap = self.snapshot()
            if snap.sent and snap.highest_reply_seq >= snap.sent - behind:
                return True
            if time.monotonic() >= deadline or not self.running:
                return False
            time.sleep(0.2)

    def wait_replies(self, count: int, timeout: float = 60.0) -> PingStats:
        """Wait until ``count`` replies came back (the target answers before a move)."""
        deadline = time.monotonic() + timeout
        snap = self.snapshot()
        while snap.received < count and time.monotonic() < deadline and self.running:
            time.sleep(0.5)
            snap = self.snapshot()
        if snap.received < count:
            raise AssertionError(
                f"{self.name}: {snap.received} of {count} replies within {timeout:.0f}s "
                f"before anything moved: {snap.describe()}"
            )
        return snap

    def finish(self, catch_up_s: float = 60.0, settle_s: float = 1.0) -> PingStats:
        """Ping ``settle_s`` more, let a slow guest answer its backlog, then stop.

        A nested guest answers late after a move (cold TCG caches); stopping at once
        would count merely queued replies as lost.  Idempotent: a finished ping
        returns its stats as they were.
        """
        if self.stats is not None:
            return self.stats
        time.sleep(settle_s)
        caught_up = self.wait_caught_up(catch_up_s)
        stats = self.stop()
        if not caught_up:
            stats.notes.append(f"replies still behind sends after {catch_up_s:g}s")
        return stats

    def stop(self, timeout: float = 10.0) -> PingStats:
        """SIGINT ping so it prints its summary, then parse everything.  Idempotent."""
        with self._lock:
            if self.stats is not None:
                return self.stats
            if self.handle is None:
                raise RuntimeError(f"{self.name}: stop() before start()")
            self.handle.signal(signal.SIGINT)
            code = self.handle.wait(timeout)
            notes: list[str] = []
            if code is None:
                notes.append(f"ping ignored SIGINT for {timeout:.0f}s; killed")
                self.handle.signal(signal.SIGKILL)
                code = self.handle.wait(5.0)
            self.exit_code = code
            self._final_output = self.handle.output()
            stats = parse_ping_output(self._final_output, self.interval)
            stats.notes.extend(self.setup_notes + notes)
            if stats.target is None:
                stats.target = self.target
            self.stats = stats
            cleanup = getattr(self.handle, "cleanup", None)
            if cleanup is not None:
                cleanup()
            return stats
