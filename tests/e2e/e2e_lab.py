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
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_katamaran
from pytest_katamaran.ping import PingStats
from pytest_katamaran.ssh import RemoteProcess

STATE_DIR = "/run/katamaran-e2e"
# The checkout this test imports: the node sees it through the host root and must run
# the same code, whatever the interpreter's site-packages has installed.
CHECKOUT = str(Path(pytest_katamaran.__file__).resolve().parent.parent)
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
        base = ["env", f"PYTHONPATH={CHECKOUT}", self.python, "-m", "pytest_katamaran.nodeside"]
        base += ["--state-dir", self.state_dir]
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
    """Where each lost ping falls relative to katamaran's events, on node A's clock.

    A lost seq's send time is the previous answered seq's send time (its reply stamp
    minus its RTT) plus one interval per seq in between.
    """
    if not stats.lost:
        return ""
    times = send_times(ping_output)
    answered = sorted(times)
    lines = ["lost pings placed on node A's clock (send time estimated):"]
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


def env_float(name: str, default: float) -> float:
    """A tunable of the e2e suite (environment: suite-local CLI options would need a rootdir
    conftest)."""
    value = os.environ.get(name)
    return float(value) if value else default


# --------------------------------------------------------------------------- workload QEMU

QEMU_PACKAGES = ("qemu-system-x86", "qemu-system-data", "qemu-system-common")


@dataclass(frozen=True)
class WorkloadQemu:
    """The QEMU the workload VMs run (both sides: it is part of the shared spec)."""

    binary: str
    datadir: str  # its own firmware (-L), "" for the system QEMU
    version: str

    def nodeside_args(self) -> list[str]:
        if not self.datadir:
            return ["--qemu-binary", self.binary]
        return ["--qemu-binary", self.binary, "--qemu-datadir", self.datadir]


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"{binary} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0].removeprefix("QEMU emulator version ").strip()


def _system_sources() -> tuple[str, str]:
    """(archive URI, codename) from this machine's own apt configuration (never hard-coded)."""
    codename = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    uri = ""
    for src in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if not src.is_file() or src.suffix not in (".list", ".sources"):
            continue
        for line in src.read_text().splitlines():
            line = line.strip()
            if line.startswith("URIs:") and "security" not in line:
                uri = uri or line.split(":", 1)[1].strip().split()[0]
            elif line.startswith("deb ") and "security" not in line:
                uri = uri or line.split()[1]
    if not (uri and codename):
        raise RuntimeError("cannot find this machine's Debian archive in its apt configuration")
    return uri, codename


def backports_qemu(cache: Path) -> WorkloadQemu:
    """QEMU from Debian's <codename>-backports, unpacked (not installed) under `cache`.

    Why: Debian 12's QEMU 7.2 loses guest stores during TCG live migration (its dirty
    bitmap fast path never re-arms the TCG TLB; upstream fix 03bfc2188f "physmem: Fix
    migration dirty bitmap coherency with TCG memory access", QEMU 9.0, not in 7.2.x),
    which corrupts the migrated workload's kernel.  Unpacking keeps the system QEMU that
    the rest of the suite uses untouched; the nodes see `cache` through the host root.
    """
    root = cache / "qemu-backports"
    marker = root / "version"
    binary = root / "usr/bin/qemu-system-x86_64"
    datadir = root / "usr/share/qemu"
    if marker.is_file() and binary.is_file():
        return WorkloadQemu(str(binary), str(datadir), marker.read_text().strip())
    uri, codename = _system_sources()
    with tempfile.TemporaryDirectory(prefix="kmr-qemu-", dir=cache) as tmp:
        work = Path(tmp)
        (work / "lists/partial").mkdir(parents=True)
        (work / "cache/archives/partial").mkdir(parents=True)
        (work / "parts").mkdir()
        (work / "sources.list").write_text(f"deb {uri} {codename}-backports main\n")
        apt = [
            "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={work / 'parts'}",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work / 'cache'}",
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        for cmd in (
            ["apt-get", *apt, "update"],
            ["apt-get", *apt, "download", *(f"{p}/{codename}-backports" for p in QEMU_PACKAGES)],
        ):
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-2:])}: {done.stderr.strip()[-500:]}")
        stage = work / "root"
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(stage)], check=True)
        staged = stage / "usr/bin/qemu-system-x86_64"
        missing = subprocess.run(["ldd", str(staged)], capture_output=True, text=True).stdout
        if "not found" in missing:
            raise RuntimeError(f"backports QEMU lacks libraries here:\n{missing}")
        version = qemu_version(str(staged))
        (stage / "version").write_text(version + "\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(stage, root)
    return WorkloadQemu(str(binary), str(datadir), version)
