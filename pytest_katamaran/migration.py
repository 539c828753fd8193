"""The guide's migration flow between two lab nodes: the resource behind ``migrate``.

One call of :meth:`Migrator.migrate` does what the guide tells an operator to do:

1. the target node routes the source node's pod range to it (``peer-route``) and starts
   the destination QEMU from the source's own command line with ``-incoming defer``
   (``dest-start``; its argv must equal the source's but for the disk and -incoming);
2. ``katamaran -mode dest`` there, then ``-mode source`` on the pod's node (both with
   ``-shared-storage`` when the pod's disk is shared), the real CLI over SSH;
3. the CNI convergence step on both nodes while the source still holds its tunnel;
4. checks that nothing of the cutover is left and that the pod answers on its new node.

It never raises for a failed migration: it returns a :class:`MigrationResult` whose
``ok`` is False and whose :meth:`~MigrationResult.explain` carries the katamaran logs,
the VMs' consoles and status, the drop counters and the nodes' serial tails, gathered
while everything still runs.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import paramiko

from katamaran.network import MIN_FRAME
from pytest_katamaran.agent.client import (
    clock_offset,
    describe_logs,
    katamaran_events,
    parse_summary,
    place_losses,
    stamped,
    wait_for_line,
)
from pytest_katamaran.checks.drops import (
    NODE_DROPS_CMD,
    describe_drops,
    drops_delta,
    parse_node_drops,
)
from pytest_katamaran.checks.ping import (
    PingMonitor,
    answers_command,
    format_seq_ranges,
    unanswered,
)
from pytest_katamaran.config import Tuning
from pytest_katamaran.errors import HarnessError, PodError
from pytest_katamaran.pod import DISK_DIR, DISK_SIZE, KataPod, PodLab
from pytest_katamaran.ssh import CommandFailed, RemoteProcess

PING_FRAME = 98  # bytes sch_plug counts per 56-byte-payload ICMP echo (Ethernet frame)
DEST_READY_TIMEOUT = 300.0
MIGRATION_TIMEOUT = 900.0
LEFTOVER_KEYS = ("plug_qdiscs", "kmr_links", "rules", "nbd_exports", "listeners")


# The longest tun ring (txqueuelen) the nodes' kernel, Debian 12's 6.1, takes: 32767
# frames, ERANGE above (measured in a lab node, 2026-12-04).  katamaran sizes the tap's ring
# for a release of -plug-limit bytes of minimum-size frames and warns when the kernel
# refuses that ring, so no limit asked here needs more.
TAP_RING_MAX = 32767


def plug_limit(max_pause_s: float, interval: float) -> int:
    """Bytes sch_plug must hold: every ping of the longest pause we allow, twice over,
    up to what the tap's ring can take in one release (at 1 ms, 60 s of pings would
    need 196000 frames; the cap still holds 10 s of them, twice over)."""
    wanted = max(1 << 20, math.ceil(max_pause_s / interval) * PING_FRAME * 2)
    return min(wanted, TAP_RING_MAX * MIN_FRAME)


def argv_without(argv: list[str], disk: str) -> list[str]:
    """A QEMU argv with the disk path blanked and -incoming dropped, for comparison."""
    out = [a.replace(disk, "<disk>") for a in argv]
    if "-incoming" in out:
        i = out.index("-incoming")
        del out[i : i + 2]
    return out


def drop_counters(pod_ip: str, tap: str) -> str:
    """Where a node may have dropped a ping: kernel drop/forward counters, the tap's link
    stats, every qdisc's (the NICs' too: an AQM drops a run after a stall), and how the
    pod IP routes and resolves right now."""
    return (
        "nstat -asz | grep -iE 'drop|discard|noroute|unreach|forw|redirect|rpfilter|fail'; "
        f"ip -s -s link show dev {tap}; tc -s qdisc show; "
        f"ip neigh show {pod_ip}; ip rule; ip route get {pod_ip}"
    )


def flag_args(flags: dict[str, Any]) -> list[str]:
    """``tap_drain_timeout=10`` -> ``-tap-drain-timeout 10``; True -> bare flag; None/False
    -> left out (so a caller can drop a default)."""
    out: list[str] = []
    for key, value in flags.items():
        name = "-" + key.replace("_", "-")
        if value is None or value is False:
            continue
        out += (
            [name]
            if value is True
            else [name, f"{value:g}" if isinstance(value, float) else str(value)]
        )
    return out


@dataclass
class MigrationResult:
    """What one ``migrate()`` did and measured.

    ``ok`` is True only when both katamaran processes exited 0 with the source's summary
    line, neither warned, both nodes converged inside the holds, nothing of the cutover
    was left behind and the pod answers on its new node.  ``problems`` says which of
    these failed; :meth:`explain` adds the evidence.
    """

    source_node: str
    dest_node: str
    shared_storage: bool
    pod: KataPod | None = None  # the pod as it now runs on the target node
    source_rc: int | None = None
    dest_rc: int | None = None
    source_log: str = ""
    dest_log: str = ""
    total_s: float | None = None
    downtime_ms: int | None = None
    ram_mib: float | None = None
    storage_mib: float | None = None
    wall_s: float | None = None
    events: dict[str, float | None] = field(default_factory=dict)  # source node's clock
    dest_events: dict[str, float | None] = field(default_factory=dict)  # target's clock
    converged: dict[str, float] = field(default_factory=dict)
    hold_end: float | None = None  # source node's clock: when its tunnel went away
    # per node, every drop counter that moved over the migration (checks.drops), read
    # while the ping still ran; or why it could not be read
    drops: dict[str, dict[str, int]] = field(default_factory=dict)
    drops_error: str | None = None
    # the target's clock minus the source node's (measured after the run), and how sure
    dest_clock_offset_s: float | None = None
    clock_uncertainty_s: float | None = None
    plug_released: str | None = None
    problems: list[str] = field(default_factory=list)
    diagnostics: str = ""  # gathered at failure time, while the VMs still ran
    _gather: Any = field(default=None, repr=False, compare=False)

    def gather(self) -> str:
        """Gather the live evidence (consoles, status, drop counters) once, now."""
        if not self.diagnostics and self._gather is not None:
            self.diagnostics = self._gather()
        return self.diagnostics

    @property
    def ok(self) -> bool:
        return not self.problems and self.source_rc == 0 and self.dest_rc == 0

    def explain(self, ping: Any = None, interval: float | None = None) -> str:
        """Why it failed: the problems, katamaran's logs, consoles, counters, node tails.

        With ``ping`` (a PingMonitor or its output) every lost ping is placed relative to
        the source's events (tunnel switch, STOP, completion, hold).
        """
        parts = [
            f"migration {self.source_node} -> {self.dest_node}: "
            + ("ok" if self.ok else "; ".join(self.problems) or "failed"),
            f"source rc={self.source_rc} dest rc={self.dest_rc} total={self.total_s} s "
            f"downtime={self.downtime_ms} ms events={self.events} dest events={self.dest_events}"
            f" converged={self.converged}",
        ]
        if ping is not None:
            stats = getattr(ping, "stats", None) or ping.snapshot()
            interval = interval or getattr(ping, "interval", 0.01)
            where = place_losses(stats, ping.output(), self.events, interval)
            parts.append(f"--- ping ---\n{stats.describe()}\n{where}".rstrip())
        if self.drops or self.drops_error:
            parts.append(describe_drops(self.drops) or f"drop counters: {self.drops_error}")
        parts.append(
            describe_logs(
                {
                    f"katamaran source ({self.source_node})": self.source_log,
                    f"katamaran dest ({self.dest_node})": self.dest_log,
                }
            )
        )
        if self.diagnostics:
            parts.append(self.diagnostics)
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "source_node": self.source_node,
            "dest_node": self.dest_node,
            "shared_storage": self.shared_storage,
            "total_s": self.total_s,
            "downtime_ms": self.downtime_ms,
            "ram_mib": self.ram_mib,
            "storage_mib": self.storage_mib,
            "wall_s": self.wall_s,
            "source_rc": self.source_rc,
            "dest_rc": self.dest_rc,
            "events_source": self.events,
            "events_dest": self.dest_events,
            "converged_at": self.converged,
            "dest_clock_offset_s": self.dest_clock_offset_s,
            "clock_uncertainty_s": self.clock_uncertainty_s,
            "plug_released": self.plug_released,
            "drops": self.drops,
            "drops_error": self.drops_error,
            "problems": self.problems,
            "katamaran_source_log": self.source_log,
            "katamaran_dest_log": self.dest_log,
        }


class Migrator:
    """Runs migrations between the nodes of a :class:`PodLab` with the given tuning.

    ``ping_interval`` is the rate the test pings the pod at: the destination's sch_plug
    must hold every ping of :attr:`Tuning.max_pause` at that rate (``-plug-limit``).
    """

    def __init__(self, lab: PodLab, tuning: Tuning, ping_interval: float) -> None:
        self.lab = lab
        self.tuning = tuning
        self.ping_interval = ping_interval
        self.results: list[MigrationResult] = []
        self.procs: list[RemoteProcess] = []

    def cleanup(self) -> None:
        """Stop any katamaran still running (a failed or interrupted migration)."""
        for proc in self.procs:
            try:
                proc.stop()
            except Exception:  # the node agent's `stop` kills it by PID as well
                pass
        self.procs.clear()

    def migrate(
        self,
        pod: KataPod,
        to: Any,
        *,
        dest_flags: dict[str, Any] | None = None,
        ping: PingMonitor | None = None,
        **source_flags: Any,
    ) -> MigrationResult:
        """Move ``pod`` to node ``to``; ``source_flags``/``dest_flags`` go to katamaran.

        ``ping``: a running ping at the pod, finished (backlog answered, then stopped) as
        soon as both katamaran processes have exited, before the harness's own checks.
        """
        if to.name == pod.node.name:
            raise PodError(to.name, f"pod {pod.ip} already runs on {to.name}")
        if pod.moved_to is not None or pod.last_ack is not None:
            raise PodError(pod.node.name, f"pod {pod.ip} is no longer running there")
        result = MigrationResult(pod.node.name, to.name, pod.shared_storage)
        self.results.append(result)
        run = _Run(self, pod, to, result, dest_flags or {}, source_flags, ping)
        result._gather = run.diagnostics
        t0 = time.monotonic()
        try:
            run.execute()
        except (HarnessError, TimeoutError, OSError) as exc:
            result.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            result.wall_s = round(time.monotonic() - t0, 1)
            run.collect_logs()
        if not result.ok:
            if not result.problems:
                result.problems.append(
                    f"katamaran exited source={result.source_rc} dest={result.dest_rc}"
                )
            result.gather()
        return result


class _Run:
    """One migration's state, step by step (what a failure message needs)."""

    def __init__(
        self,
        owner: Migrator,
        pod: KataPod,
        to: Any,
        result: MigrationResult,
        dest_flags: dict[str, Any],
        source_flags: dict[str, Any],
        ping: PingMonitor | None = None,
    ) -> None:
        self.owner = owner
        self.ping = ping
        self.t = owner.tuning
        self.pod = pod
        self.to = to
        self.result = result
        self.a = pod.side
        self.b = owner.lab.side(to)
        self.dest_flags = dest_flags
        self.source_flags = source_flags
        self.src_proc: RemoteProcess | None = None
        self.dst_proc: RemoteProcess | None = None
        self.dest_pod: KataPod | None = None

    def _wait(self, proc: RemoteProcess, needle: str, timeout: float, what: str) -> None:
        why = wait_for_line(proc, needle, timeout)
        if why is not None:
            raise HarnessError(f"katamaran {what}: no {needle!r} ({why})")

    def execute(self) -> None:
        pod, a, b, t, res = self.pod, self.a, self.b, self.t, self.result
        # 1. The target routes the source's pod range; the same VM waits there, -incoming.
        if pod.export is not None:
            b.call("nbd-attach", *pod.export.attach_args())
            dst_disk, create = pod.disk, []
        else:
            dst_disk, create = f"{DISK_DIR}/dst.qcow2", ["--disk-size", DISK_SIZE]
        b.call("peer-route", "--dst", pod.pod_cidr, "--via", pod.node.private_ip)
        dest = b.call(
            "dest-start",
            "--spec", json.dumps(pod.spec),
            "--pod-ip", pod.ip,
            "--disk", dst_disk, *create,
            "--tap", pod.tap,
            timeout=600,
        )  # fmt: skip
        self.dest_pod = KataPod(
            node=self.to,
            ip=pod.ip,
            qmp_socket=str(dest["qmp"]),
            tap=pod.tap,
            drive_id=pod.drive_id,
            disk=dst_disk,
            side=b,
            role="dest",
            kind=pod.kind,
            export=pod.export,
            spec=pod.spec,
            argv=list(dest.get("argv", [])),
            previous=pod,
        )
        if dest.get("status") != "inmigrate":
            raise HarnessError(f"destination QEMU is {dest.get('status')!r}, not inmigrate")
        if argv_without(self.dest_pod.argv, dst_disk) != argv_without(pod.argv, pod.disk):
            res.problems.append(
                "destination QEMU argv differs from the source's beyond disk and -incoming"
            )

        # The CNI's routes for after the move, recorded now so that `stop` removes them
        # whatever happens; they are set mid-hold (below).
        a.call("converge", "--role", "source", "--pod-ip", pod.ip, "--via", self.to.private_ip,
               "--tap", pod.tap, "--record-only")  # fmt: skip
        b.call("converge", "--role", "dest", "--pod-ip", pod.ip, "--tap", pod.tap, "--record-only")

        drops_before = self.read_drops()
        # 2. katamaran: destination first, then the source; the CNI converges mid-hold.
        shared = ["-shared-storage"] if pod.shared_storage else []
        self.dst_proc = b.katamaran(
            "-mode", "dest", "-qmp", self.dest_pod.qmp_socket, "-tap", pod.tap,
            "-vm-ip", pod.ip, "-source-ip", pod.node.private_ip,
            "-tunnel-hold", f"{t.dest_hold_s:g}",
            "-plug-limit", str(plug_limit(t.max_pause, self.owner.ping_interval)),
            *shared, *flag_args(self.dest_flags),
        )  # fmt: skip
        self.owner.procs.append(self.dst_proc)
        self._wait(self.dst_proc, "destination ready", DEST_READY_TIMEOUT, "dest")
        self.src_proc = a.katamaran(
            "-mode", "source", "-qmp", pod.qmp_socket,
            "-dest-ip", self.to.private_ip, "-vm-ip", pod.ip,
            "-tunnel-hold", f"{t.tunnel_hold:g}", "-tap-drain-timeout", f"{t.tap_drain:g}",
            *shared, *flag_args(self.source_flags),
        )  # fmt: skip
        self.owner.procs.append(self.src_proc)
        self._wait(self.src_proc, "migration completed in", MIGRATION_TIMEOUT, "source")
        time.sleep(t.converge_delay)
        # The CNI's step mid-hold: the routes only, no Python started on the busy nodes
        # (see NodeSide.route_now); the agents recorded them for `stop` beforehand.
        with ThreadPoolExecutor(2) as pool:
            conv_b = pool.submit(b.route_now, "dest", pod.ip, pod.tap)
            conv_a = pool.submit(a.route_now, "source", pod.ip, pod.tap, self.to.private_ip)
            res.converged = {
                pod.node.name: conv_a.result(120),
                self.to.name: conv_b.result(120),
            }
        res.source_rc = self.src_proc.wait(t.tunnel_hold + 300)
        res.dest_rc = self.dst_proc.wait(t.dest_hold_s + 300)
        self.measure_clocks()
        if drops_before is not None and (drops_after := self.read_drops()) is not None:
            res.drops = {
                name: drops_delta(drops_before[name], drops_after[name]) for name in drops_after
            }
        if self.ping is not None:
            # The migration is over: what the harness's own checks below cost a slow
            # nested guest (node-agent calls on a TCG node) is not the migration's.
            self.ping.finish()
        pod.moved_to = self.dest_pod
        res.pod = self.dest_pod
        self.collect_logs()
        self.check()

    def read_drops(self) -> dict[str, dict[str, int]] | None:
        """Every drop counter on both nodes, pods' netns included (checks.drops); None,
        with the reason in the result, if a node cannot say (not the migration's fault)."""
        sides = (self.a, self.b)
        try:
            with ThreadPoolExecutor(2) as pool:
                runs = {
                    s.name: pool.submit(s.node.ssh.sudo, NODE_DROPS_CMD, timeout=60) for s in sides
                }
                return {name: parse_node_drops(run.result().stdout) for name, run in runs.items()}
        except (OSError, ValueError, IndexError, CommandFailed, paramiko.SSHException) as exc:
            self.result.drops_error = f"{type(exc).__name__}: {exc}"
            return None

    def measure_clocks(self) -> None:
        """The target's clock against the source node's, for the timeline (see
        clock_offset); a node that cannot say leaves the stamps as they are."""
        res = self.result
        try:
            off_a, err_a = clock_offset(self.a.node.ssh)
            off_b, err_b = clock_offset(self.b.node.ssh)
        except (OSError, ValueError, CommandFailed, paramiko.SSHException):
            return  # not the migration's failure: the timeline says it is uncorrected
        res.dest_clock_offset_s = round(off_b - off_a, 6)
        res.clock_uncertainty_s = round(err_a + err_b, 6)

    def collect_logs(self) -> None:
        res = self.result
        if self.src_proc is not None:
            res.source_log = self.src_proc.errors()
        if self.dst_proc is not None:
            res.dest_log = self.dst_proc.errors()

    def check(self) -> None:
        """Everything `ok` promises beyond the exit codes."""
        res, t, problems = self.result, self.t, self.result.problems
        summary = parse_summary(res.source_log)
        if summary is None:
            problems.append("no summary line from the source")
        else:
            res.total_s, res.downtime_ms = summary["total_s"], summary["downtime_ms"]
            res.ram_mib, res.storage_mib = summary["ram_mib"], summary["storage_mib"]
        if res.source_rc != 0 or res.dest_rc != 0:
            problems.append(f"katamaran exited source={res.source_rc} dest={res.dest_rc}")
        warned = [ln for ln in (res.source_log + res.dest_log).splitlines() if "WARNING:" in ln]
        if warned:
            problems.append("katamaran warned (a cutover piece is missing): " + " | ".join(warned))
        res.events, res.dest_events = katamaran_events(res.source_log, res.dest_log)
        released = [ln for _, ln in stamped(res.dest_log) if "released" in ln]
        res.plug_released = released[0] if released else None
        hold = res.events["hold start"]
        if hold is None:
            problems.append("the source never held a tunnel")
        else:
            res.hold_end = hold + t.tunnel_hold
            shift = {self.to.name: res.dest_clock_offset_s or 0.0}  # B's stamps on A's clock
            for name, at in res.converged.items():
                at -= shift.get(name, 0.0)
                if at >= res.hold_end:
                    problems.append(
                        f"{name} converged {at - hold:.2f} s into a {t.tunnel_hold:g} s "
                        "hold: raise --tunnel-hold"
                    )
        received = res.dest_events["received"]
        at_b = res.converged.get(self.to.name)
        if received is None:
            problems.append("the destination never logged `migration received in`")
        elif at_b is not None and at_b >= received + t.dest_hold_s:
            problems.append(
                f"{self.to.name} converged {at_b - received:.2f} s into its "
                f"{t.dest_hold_s:g} s hold: raise --dest-hold"
            )
        self._check_nodes()

    def _check_nodes(self) -> None:
        """Nothing of the cutover left; source paused, destination running, pod answers."""
        problems, a, b = self.result.problems, self.a, self.b
        with ThreadPoolExecutor(2) as pool:
            left = {s.name: pool.submit(s.call, "leftovers") for s in (a, b)}
            status = {s.name: pool.submit(s.call, "status", timeout=60) for s in (a, b)}
            for name, fut in left.items():
                found = fut.result()
                for key in LEFTOVER_KEYS:
                    if found.get(key):
                        problems.append(f"{name}: leftover {key}: {found[key]}")
            src_state = status[a.name].result().get("source", {}).get("qmp_status")
            dst_state = status[b.name].result().get("dest", {}).get("qmp_status")
        if src_state != "postmigrate":
            problems.append(f"source VM on {a.name} is {src_state!r}, not postmigrate")
        if dst_state != "running":
            problems.append(f"destination VM on {b.name} is {dst_state!r}, not running")
        # The workload answers on the target itself (converged route, no tunnel).
        ip = self.pod.ip
        pong = self.to.ssh.run(answers_command(ip), timeout=60, check=False)
        missing = unanswered(pong.stdout)
        if missing:
            problems.append(
                f"pod {ip} does not answer on {self.to.name} (no reply to icmp_seq "
                f"{format_seq_ranges(missing)}): {pong.stdout.strip()}"
            )

    def diagnostics(self) -> str:
        """The VMs' consoles and status, drop counters and node serial tails, gathered now."""
        parts = []
        roles = ((self.a, "source"), (self.b, "dest"))
        for side, which in roles:
            try:
                con = side.call("console", "--which", which, "--lines", "60", timeout=60)
                parts.append(f"--- {which} VM console on {side.name} ---\n{con['tail']}")
            except Exception as exc:  # the failure itself may be that the VM is gone
                parts.append(f"--- {which} VM console on {side.name}: unavailable ({exc})")
        for side, _ in roles:
            try:  # e.g. "paused" after an I/O error, or a QEMU that died
                parts.append(f"--- VMs on {side.name} ---\n{side.call('status', timeout=60)}")
            except Exception as exc:
                parts.append(f"--- VMs on {side.name}: unavailable ({exc})")
            try:
                cmd = drop_counters(self.pod.ip, self.pod.tap)
                out = side.node.ssh.sudo(cmd, timeout=60, check=False)
                parts.append(f"--- drop counters on {side.name} ---\n{out.stdout}{out.stderr}")
            except Exception as exc:
                parts.append(f"--- drop counters on {side.name}: unavailable ({exc})")
            parts.append(f"--- serial log tail of {side.name} ---\n{side.serial_tail()}")
        return "\n".join(parts)
