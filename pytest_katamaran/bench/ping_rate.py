"""Zero-drop figure at a given ping rate: a real migration with the real network cutover.

    python -m pytest_katamaran.bench.ping_rate --interval 0.001 \\
        --out benchmarks/results/ping-1ms.json

Why a lab node: the cutover needs ipip and sch_plug, which this host's kernel lacks.  One
Debian-kernel lab node boots (it sees this host's root, so the repo, the cached test
guest and the backports QEMU are there) and this module runs again inside it as root
(``--inside``).  There `locallab.Rig` builds what the host-side integration tests use
(two netns nodes, a Kata-shaped pod with the tcfilter redirect on node a, the
destination's tap0_kata on node b, two QEMUs, the katamaran CLI as processes), plus a
client netns behind node a.  Now the cutover is real: the source tunnels the VM's
traffic to b, b holds it in sch_plug until RESUME.

The nested guest runs as the e2e's pods do (``--pod-accel``, default auto): under the
node's KVM where a real boot proves it (then the node has one vCPU, qemu.node.node_cpus),
else under TCG.

Two measurements, both `ping -D -O -i <interval>` from the client to the VM:
1. the guest's answer rate without any migration (a nested TCG guest may not keep up
   with 1000/s: then losses would be the lab's, not the migration's);
2. the same ping across a migration with both sides at the default tunnel hold; the CNI
   converges (routes on both nodes) mid-hold as in the e2e.
The JSON holds sent/lost, the longest gap, RTTs, QEMU's downtime, the plug's released
packets and both tools' logs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_katamaran.agent.client import parse_summary
from pytest_katamaran.lab.nested import add_flags as nested_flags
from pytest_katamaran.qemu.accel import ACCEL_CHOICES

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SOURCE_IP, DEST_IP = "10.0.0.1", "10.0.0.2"  # locallab's HostLab nodes
CLIENT_NET = ("10.7.0.1", "10.7.0.2", "10.7.0.0/24")  # node a's side, the client, the subnet
TUNNEL_HOLD = 5.0  # katamaran's default (config.TUNNEL_HOLD), the same on both sides
CONVERGE_DELAY = 2.0  # after `migration completed`, as the e2e's default --converge-delay
MAX_PAUSE = 30.0  # the plug holds this long a pause's pings (as the e2e)
RELEASED_RE = re.compile(r"released (\d+) held packet")


# --------------------------------------------------------------------------- inside the node


def _say(message: str) -> None:
    print(f"ping_rate: {message}", file=sys.stderr, flush=True)


class Client:
    """A client netns behind node a (10.7.0.2 via 10.7.0.1); node b routes it back via a.

    Why not ping from node a itself: locally generated packets take a different path
    (no forwarding on a); a client is what the e2e and a real cluster have.
    """

    def __init__(self, node_a: str, node_b: str) -> None:
        self.netns = f"kmr-cl-{secrets.token_hex(3)}"
        self.node_a, self.node_b = node_a, node_b
        self._made = False

    def up(self) -> None:
        gw, me, net = CLIENT_NET
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self._made = True
        for cmd in (
            f"ip -n {self.netns} link set lo up",
            f"ip -n {self.netns} link add eth0 type veth peer name kmrcl netns {self.node_a}",
            f"ip -n {self.netns} addr add {me}/24 dev eth0",
            f"ip -n {self.netns} link set eth0 up",
            f"ip -n {self.netns} route add default via {gw}",
            f"ip -n {self.node_a} addr add {gw}/24 dev kmrcl",
            f"ip -n {self.node_a} link set kmrcl up",
            f"ip -n {self.node_b} route add {net} via {SOURCE_IP}",
        ):
            subprocess.run(cmd.split(), check=True, capture_output=True)

    def down(self) -> None:
        """Delete the client netns (its veth goes with it; node b's route goes with b)."""
        if self._made:
            self._made = False
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


def _ping_figures(stats: Any, seconds: float) -> dict[str, Any]:
    out = stats.as_dict()
    out.pop("lost", None)  # the ranges say the same, shorter
    out.pop("in_flight", None)
    out["seconds"] = round(seconds, 3)
    out["send_rate_per_s"] = round(stats.sent / seconds, 1) if seconds else None
    out["answer_rate_per_s"] = round(stats.received / seconds, 1) if seconds else None
    return out


def answer_rate(target: str, interval: float, netns: str, seconds: float) -> dict[str, Any]:
    """The guest's answers to `ping -i interval` for `seconds`, nothing migrating."""
    from pytest_katamaran.checks.ping import PingMonitor

    mon = PingMonitor.local(target, interval, netns=netns).start()
    t0 = time.monotonic()
    try:
        time.sleep(seconds)
        stats = mon.finish(catch_up_s=10.0, settle_s=0.0)  # ping sends until it stops
    finally:
        mon.stop()  # idempotent: Ctrl-C or an error must not leave ping running
    return _ping_figures(stats, time.monotonic() - t0)


def migrate_under_ping(rig: Any, client: Client, interval: float) -> dict[str, Any]:
    """One migration with the cutover, a ping at `interval` running from the client."""
    from pytest_katamaran.checks.ping import PingMonitor
    from pytest_katamaran.lab.local import VM_IP, wait_for_text
    from pytest_katamaran.migration import plug_limit

    hold = f"{TUNNEL_HOLD:g}"
    mon = PingMonitor.local(VM_IP, interval, netns=client.netns).start()
    try:
        t0 = time.monotonic()
        mon.wait_replies(10, timeout=300)
        dest = rig.start_dest(
            "-vm-ip", VM_IP, "-source-ip", SOURCE_IP, "-tunnel-hold", hold,
            "-plug-limit", str(plug_limit(MAX_PAUSE, interval)),
        )  # fmt: skip
        source = rig.start_source(DEST_IP, "-tunnel-hold", hold)
        wait_for_text(rig.tmp / "source.log", "migration completed in", 900, source)
        completed = time.monotonic() - t0
        time.sleep(CONVERGE_DELAY)  # the CNI converges mid-hold, as in the e2e
        rig.dest_tap.add_pod_route()
        rig.lab.run("a", ["ip", "route", "replace", f"{VM_IP}/32", "via", DEST_IP], check=True)
        converged = time.monotonic() - t0
        source_rc, dest_rc = rig.finish(source, 300), rig.finish(dest, 300)
        stats = mon.finish(catch_up_s=30.0, settle_s=1.0)
        sent_for = time.monotonic() - t0  # ping sends until it stops
    finally:
        mon.stop()  # idempotent: a failure above must not leave ping running
    source_log, dest_log = rig.log("source.log"), rig.log("dest.log")
    summary = parse_summary(source_log) or {}
    released = RELEASED_RE.search(dest_log)
    warnings = [ln for ln in (source_log + dest_log).splitlines() if "WARNING" in ln]
    return {
        "ping": _ping_figures(stats, sent_for),
        "zero_drop": stats.lost_count == 0 and stats.sent > 0,
        "downtime_ms": summary.get("downtime_ms"),
        "total_s": summary.get("total_s"),
        "ram_mib": summary.get("ram_mib"),
        "storage_mib": summary.get("storage_mib"),
        "plug_released": int(released[1]) if released else None,
        "source_rc": source_rc,
        "dest_rc": dest_rc,
        "dest_status": rig.status(rig.dst),
        "completed_after_s": round(completed, 2),
        "converged_after_s": round(converged, 2),
        "tunnel_hold_s": TUNNEL_HOLD,
        "warnings": warnings,
        "source_log": source_log.splitlines(),
        "dest_log": dest_log.splitlines(),
    }


def inside(args: argparse.Namespace) -> dict[str, Any]:
    """The whole scenario, as root in the lab node; everything made here is removed."""
    from pyroute2.netlink.exceptions import NetlinkError

    from pytest_katamaran.lab.local import VM_IP
    from pytest_katamaran.lab.nested import NestedGuests

    nested = NestedGuests.from_args(args, args.accel)
    accel = nested.accel
    _say(nested.note)
    tmp = Path(tempfile.mkdtemp(prefix="kmr-pingrate-"))
    rig = nested.rig(tmp)
    rig.echo = True  # katamaran's lines go to stderr: the host relays them as progress
    client = Client(rig.lab.a.netns, rig.lab.b.netns)
    facts: dict[str, Any] = {
        "node_kernel": platform.release(),
        "node_cpus": os.cpu_count(),
        "guest_accel": accel.name,
        "guest_accel_reason": accel.reason,
    }
    try:
        t0 = time.monotonic()
        try:
            rig.up()
        except NetlinkError as err:
            # Seen once on a loaded TCG node: creating the pod's tap failed with ENODATA.
            _say(f"lab setup failed ({err}); building it once more")
            rig.down()
            rig.up()
        client.up()
        facts["guest_boot_s"] = round(time.monotonic() - t0, 1)
        _say(f"nested guest up in {facts['guest_boot_s']:g} s; pinging every {args.interval:g} s")
        if args.baseline_seconds > 0:
            facts["baseline"] = answer_rate(
                VM_IP, args.interval, client.netns, args.baseline_seconds
            )
            _say(f"without migration: {facts['baseline']['description']}")
        try:
            facts["migration"] = migrate_under_ping(rig, client, args.interval)
        except (AssertionError, OSError, RuntimeError, subprocess.SubprocessError) as err:
            # keep the answer-rate figure: say what stopped the migration run
            facts["migration_error"] = f"{type(err).__name__}: {err}"[:4000]
            _say(f"migration run failed: {facts['migration_error'][:500]}")
        else:
            _say(f"across the migration: {facts['migration']['ping']['description']}")
    finally:
        client.down()
        rig.down()
        shutil.rmtree(tmp, ignore_errors=True)
    return facts


# --------------------------------------------------------------------------- on this host


def run(
    interval: float,
    *,
    baseline_seconds: float = 10.0,
    results_dir: Path | None = None,
    timeout: float = 3600.0,
    pod_accel: str = "auto",
) -> dict[str, Any]:
    """Boot one lab node, run the scenario in it, return its figures (plus this machine's)."""
    from pytest_katamaran.images.guest import build_guest, cache_root
    from pytest_katamaran.lab.nested import host_flags
    from pytest_katamaran.lab.node import run_in_node
    from pytest_katamaran.qemu.binary import workload_qemu

    guest = build_guest()
    qemu, note = workload_qemu("backports", cache_root())
    started = dt.datetime.now(dt.timezone.utc)
    inner = [
        "-m", "pytest_katamaran.bench.ping_rate",
        "--inside", "--interval", f"{interval:g}", "--baseline-seconds", f"{baseline_seconds:g}",
        *host_flags(guest, qemu), "--pod-accel", pod_accel,
    ]  # fmt: skip
    facts = run_in_node(inner, results_dir=results_dir, timeout=timeout, pod_accel=pod_accel)
    facts.update(
        interval_s=interval,
        rate_per_s=round(1.0 / interval),
        date=started.isoformat(timespec="seconds"),
        machine={
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "host_kernel": platform.release(),
            "accel": f"tcg (lab node, {facts.get('node_cpus')} vCPU) with the nested guest "
            f"under {facts.get('guest_accel', '?')}",
            "workload_qemu": qemu.version,
            "workload_qemu_note": note,
        },
    )
    return facts


def describe(facts: dict[str, Any]) -> str:
    """The figures in one paragraph, for the terminal."""
    lines = [f"ping every {facts['interval_s'] * 1000:g} ms ({facts['rate_per_s']}/s)"]
    base = facts.get("baseline")
    if base:
        lines.append(
            f"  without migration: sent {base['sent']} in {base['seconds']:g} s, "
            f"answered {base['received']} ({base['answer_rate_per_s']:g}/s), "
            f"lost {base['lost_count']}, rtt max {base['rtt_max_ms']} ms"
        )
    mig = facts.get("migration")
    if mig is None:
        lines.append(f"  migration run failed: {facts.get('migration_error')}")
        return "\n".join(lines)
    ping = mig["ping"]
    lines.append(
        f"  across the migration: sent {ping['sent']}, lost {ping['lost_count']}"
        f" ({ping['lost_ranges'] or 'none'}), longest gap {ping['longest_gap_s']} s, "
        f"rtt min/avg/max {ping['rtt_min_ms']}/{ping['rtt_avg_ms']}/{ping['rtt_max_ms']} ms"
    )
    lines.append(
        f"  downtime {mig['downtime_ms']} ms, plug released {mig['plug_released']} packet(s), "
        f"exit codes source {mig['source_rc']} dest {mig['dest_rc']}, "
        f"zero drop: {'yes' if mig['zero_drop'] else 'NO'}"
    )
    return "\n".join(lines)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.0001 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"interval must be 0.0001..1 s, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_katamaran.bench.ping_rate",
        description="Zero-drop figure of one migration with the real cutover at a ping rate.",
    )
    parser.add_argument("--interval", type=_interval, default=0.001, help="seconds (0.001)")
    parser.add_argument(
        "--baseline-seconds", type=float, default=10.0, help="answer-rate ping first (10)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/ping-<ms>ms.json)"
    )
    parser.add_argument(
        "--pod-accel",
        dest="accel",
        choices=ACCEL_CHOICES,
        default="auto",
        help="the nested guest's accelerator, as the harness's --pod-accel (auto)",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    nested_flags(parser, hidden=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inside:
        try:
            print(json.dumps(inside(args)))
        except Exception as err:  # noqa: BLE001 - one line for the host, not a traceback
            first = (str(err).splitlines() or [""])[0]
            print(f"in the lab node: {type(err).__name__}: {first}", file=sys.stderr)
            return 1
        return 0
    if os.geteuid() != 0:
        print("ping_rate: must run as root (the lab node and its networks)", file=sys.stderr)
        return 2
    from pytest_katamaran.lab.node import NodeRunError

    try:
        facts = run(args.interval, baseline_seconds=args.baseline_seconds, pod_accel=args.accel)
    except NodeRunError as err:
        print(f"ping_rate: {err}", file=sys.stderr)
        return 1
    print(describe(facts))
    out = args.out or RESULTS / f"ping-{args.interval * 1000:g}ms.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(facts, indent=2) + "\n")
    print(f"written to {out}")
    return 0 if facts.get("migration", {}).get("zero_drop") else 1


if __name__ == "__main__":
    sys.exit(main())
