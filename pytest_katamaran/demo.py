"""`python -m pytest_katamaran.demo`: one real live migration on this machine, end to end.

Two network-namespace "nodes", a small VM (TCG) that keeps writing to its disk on node A,
`katamaran -mode dest` on node B, `katamaran -mode source` on node A, a ping from node A
to the VM all along (routes converge to node B once the migration completed); then the
checks a user would make by hand: destination running, source postmigrate, no write lost.
It leaves `results/demo.json` and its timeline picture `results/demo.timeline.png`.

This host's kernel has no ipip/sch_plug, so there is no packet cutover here: pings sent
between STOP and the routes' convergence are lost, and the picture shows where.  That is
drawn, not judged (the e2e on Debian-kernel nodes proves zero loss).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_katamaran.agent.client import katamaran_events, parse_summary
from pytest_katamaran.checks.disk import last_ack, verify_writes
from pytest_katamaran.checks.ping import LocalRunner, PingMonitor
from pytest_katamaran.images.guest import build_guest, cache_root
from pytest_katamaran.lab.local import VM_IP, GuestPanicked, Rig, wait_for_text
from pytest_katamaran.migration import MigrationResult
from pytest_katamaran.qemu.binary import WORKLOAD_QEMU_CHOICES, workload_qemu
from pytest_katamaran.qemu.sandbox import Sandbox
from pytest_katamaran.timeline import after_resume_figures, draw_results

TITLE = "python -m pytest_katamaran.demo"
DEMO_PING_INTERVAL = 0.01  # the guide's 100 pings/s
NOTE = (
    "One host clock. This host's kernel has no ipip/sch_plug: no packet cutover, so pings "
    "to the paused VM are lost until node A's route converges to node B."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_katamaran.demo", description=__doc__)
    parser.add_argument("--shared-storage", action="store_true", help="skip the NBD mirror")
    parser.add_argument("--ipv6", action="store_true", help="migrate over IPv6 (fd00:10::2)")
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=DEMO_PING_INTERVAL,
        metavar="SECONDS",
        help=f"node A's ping to the VM (default {DEMO_PING_INTERVAL:g})",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="where demo.json and demo.timeline.png go (default results)",
    )
    parser.add_argument(
        "--qemu",
        choices=WORKLOAD_QEMU_CHOICES,
        default="backports",
        help="the VM's QEMU: Debian backports' (default, unpacked into the cache on first "
        "use, as the test pods: the system's 7.2 loses TCG guest stores during migration, "
        "which now and then panics the migrated guest) or the system one",
    )
    args = parser.parse_args(argv)
    if args.ping_interval <= 0:
        parser.error(f"--ping-interval must be positive, got {args.ping_interval:g}")

    def say(message: str) -> None:
        print(f"demo: {message}", file=sys.stderr, flush=True)

    say("building the test guest (cached after the first run)")
    guest = build_guest()
    if args.qemu == "backports":
        say("fetching Debian backports' QEMU for the VM (cached after the first run)")
    qemu, note = workload_qemu(args.qemu, cache_root())
    if note:
        say(f"WARNING: {note}")
    say(f"the VM runs QEMU {qemu.version} ({qemu.binary})")
    with tempfile.TemporaryDirectory(prefix="katamaran-demo-") as tmp:
        rig = Rig(
            guest,
            Path(tmp),
            writer=True,
            shared=args.shared_storage,
            echo=True,
            routed=True,
            qemu=qemu,
        )
        record: dict[str, Any] = {"qemu": {"version": qemu.version, "binary": qemu.binary}}
        rc = 1
        try:
            rc = run(rig, args, say, record)
            return rc
        finally:
            pinger = record.get("pinger")
            if pinger is not None and pinger.handle is not None:
                pinger.stop()
            rig.down()
            if "migration" in record:
                try:
                    write_results(args.results_dir, record, ok=rc == 0, say=say)
                except OSError as exc:
                    say(f"WARNING: results not written: {exc}")


def run(rig: Rig, args: argparse.Namespace, say: Any, record: dict[str, Any]) -> int:
    """Boot, ping, migrate, converge, check; what the results need goes into ``record``."""
    started = time.monotonic()
    say("node A / node B namespaces up; booting the VM on node A (TCG)")
    rig.up()
    say(f"VM booted in {rig.src.boot_time:.1f} s; it writes to its disk continuously")
    pinger = record["pinger"] = PingMonitor(
        LocalRunner(rig.lab.a.netns),
        VM_IP,
        args.ping_interval,
        name=f"ping {VM_IP} from node A",
        extra_args=("-I", rig.lab.a.ipv4),
    )
    try:
        pinger.start()
        pinger.wait_replies(20, timeout=60)
    except (RuntimeError, AssertionError) as exc:
        say(f"FAILED: node A cannot ping the VM: {exc}")
        return 1
    say(f"node A pings the VM every {args.ping_interval * 1000:g} ms")
    dest = rig.start_dest()
    source = rig.start_source("fd00:10::2" if args.ipv6 else "10.0.0.2")
    converged: dict[str, float] = {}
    try:
        wait_for_text(rig.tmp / "source.log", "migration completed in", 180, source)
        converged = rig.converge()
        say("routes converged: node A sends the VM's traffic to node B")
    except AssertionError:
        pass  # the source ended without completing: its exit code and log say why
    src_rc, dst_rc = rig.finish(source), rig.finish(dest)
    stats = record["ping"] = pinger.finish(catch_up_s=10.0)
    record["ping_log"] = pinger.output()
    say(f"ping: {stats.describe()}")
    record["migration"] = demo_result(rig, src_rc, dst_rc, converged)
    if src_rc or dst_rc:
        say(f"FAILED: katamaran source exited {src_rc}, dest exited {dst_rc}")
        for side, box in (("source", rig.src), ("destination", rig.dst)):
            if not box.alive():  # how it ended says more than katamaran's QMP error
                say_gone(rig, box, side, say)
        return 1
    try:
        src_state, dst_state = rig.status(rig.src), rig.status(rig.dst)
    except GuestPanicked as panic:
        say_panic("destination", panic, say)
        return 1
    say(f"source VM: {src_state}, destination VM: {dst_state}")
    acked_src = last_ack(rig.src.console_log)
    time.sleep(1.0)  # let the writer ack a few more writes on the destination
    acked = max(acked_src, last_ack(rig.dst.console_log))
    rig.src.stop()
    rig.dst.stop()
    report = verify_writes(rig.dst_disk, acked)
    record["disk"] = str(report)
    say(f"disk: {acked} writes acknowledged by the guest ({acked_src} before the switch)")
    say(f"disk check: {report}")
    ok = report.ok and src_state == "postmigrate" and dst_state == "running"
    say(f"{'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def say_panic(side: str, panic: GuestPanicked, say: Any) -> None:
    say(f"the {side} guest kernel panicked after migration ({panic});")
    say("QEMU before 9.0 loses TCG guest stores during migration (bare QMP too): run the")
    say("demo on backports' QEMU (--qemu backports, the default)")


def say_gone(rig: Rig, box: Sandbox, side: str, say: Any) -> None:
    """A QEMU that is gone: its guest's panic, or its exit code, stderr and console."""
    try:
        rig.status(box)
    except GuestPanicked as panic:
        say_panic(side, panic, say)
    except AssertionError as gone:
        say(f"the {side} {gone}")


def demo_result(rig: Rig, src_rc: int, dst_rc: int, converged: dict[str, float]) -> MigrationResult:
    """The demo's migration in the e2e's shape (``MigrationResult``), from stamped logs."""
    res = MigrationResult("node A", "node B", rig.shared, source_rc=src_rc, dest_rc=dst_rc)
    res.source_log, res.dest_log = rig.stamped_log("source.log"), rig.stamped_log("dest.log")
    res.events, res.dest_events = katamaran_events(res.source_log, res.dest_log)
    res.converged = converged
    summary = parse_summary(res.source_log)
    if summary is not None:
        res.total_s, res.downtime_ms = summary["total_s"], summary["downtime_ms"]
        res.ram_mib, res.storage_mib = summary["ram_mib"], summary["storage_mib"]
    released = [ln for ln in res.dest_log.splitlines() if "VM resumed: released" in ln]
    res.plug_released = released[0] if released else None
    return res


def write_results(out_dir: Path, record: dict[str, Any], *, ok: bool, say: Any) -> None:
    """``demo.json`` (the e2e results' shape), ``demo.ping1.txt`` (the raw ping, so
    ``python -m pytest_katamaran.timeline`` can redraw) and ``demo.timeline.png``.

    A picture that cannot be drawn is a warning: the migration's own verdict stands.
    """
    results = {k: record[k] for k in ("migration", "ping", "disk") if k in record}
    figures = after_resume_figures(results)
    if figures is not None:
        results["after_resume"] = figures
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "nodeid": TITLE,
        "outcome": "passed" if ok else "failed",
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "katamaran": {
            "ping_interval": getattr(record.get("ping"), "interval", None),
            "qemu": record.get("qemu"),
            "timeline_note": NOTE,
        },
        "results": results,
    }
    path = out_dir / "demo.json"
    path.write_text(json.dumps(payload, indent=2, default=lambda o: o.as_dict()) + "\n")
    (out_dir / "demo.ping1.txt").write_text(record.get("ping_log", ""))
    say(f"results: {path}")
    picture = out_dir / "demo.timeline.png"
    try:
        draw_results(results, TITLE, picture, note=NOTE)
    except Exception as exc:  # the picture illustrates; it never decides
        say(f"WARNING: no timeline picture: {type(exc).__name__}: {exc}")
        return
    say(f"timeline: {picture}")


if __name__ == "__main__":
    sys.exit(main())
