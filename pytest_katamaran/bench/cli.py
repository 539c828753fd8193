"""`python -m pytest_katamaran.bench`: run the grid, write the JSON and the pictures.

Not part of the test run: the full grid takes about half an hour under TCG.  Each
migration gets a fresh pair of VMs with the same configuration; within a round the
two flows alternate which goes first, so a drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_katamaran.bench import grid, stats
from pytest_katamaran.bench.run import measure
from pytest_katamaran.qemu.binary import WORKLOAD_QEMU_CHOICES

DEFAULT_OUT = Path("benchmarks/results")
DEFAULT_ROUNDS = 3


class BenchError(Exception):
    """A one-line reason the benchmark cannot run (exit 2)."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_katamaran.bench",
        description="katamaran vs the bare QMP sequence over a grid of VM sizes and loads",
    )
    parser.add_argument("--quick", action="store_true", help="one small point, one round")
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds per point (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--point",
        action="append",
        metavar="LABEL",
        help="run only this grid point (repeatable), e.g. disk512-ram512-disk-writer-nbd",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results directory ({DEFAULT_OUT})"
    )
    parser.add_argument(
        "--qemu",
        choices=WORKLOAD_QEMU_CHOICES,
        default="backports",
        help="the QEMU both flows migrate: Debian backports' (default, as the harness's "
        "pods: it has block-job-change, and 7.2's TCG migration can corrupt a guest) or "
        "the system one",
    )
    parser.add_argument(
        "--katamaran-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for both katamaran processes (repeatable), e.g. "
        "--katamaran-arg=-stream-buffer --katamaran-arg=262144; recorded in the results",
    )
    parser.add_argument(
        "--plot-only",
        type=Path,
        metavar="JSON",
        help="redraw the pictures from an earlier results JSON, run nothing",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.rounds is None:
        args.rounds = 1 if args.quick else DEFAULT_ROUNDS
    if args.point:
        known = [p.label for p in grid.expand(args.quick)]
        unknown = [label for label in args.point if label not in known]
        if unknown:
            parser.error(f"no grid point {unknown[0]!r}; the points are: {', '.join(known)}")
    return args


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (the lab creates network namespaces and taps)")
    for tool in ("qemu-system-x86_64", "qemu-img", "qemu-io", "openssl"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (apt-get install qemu-system-x86 qemu-utils)")


def describe(row: dict[str, Any]) -> str:
    """The figure just measured, for the progress line."""
    if row.get("error"):
        return "FAILED: " + row["error"].splitlines()[0][:200]
    parts = [f"total {row['total_s']:.2f} s"]
    if row.get("migration_s") is not None:
        parts.append(f"migration {row['migration_s']:.2f} s")
    if row.get("downtime_ms") is not None:
        parts.append(f"downtime {row['downtime_ms']} ms")
    if row.get("stop_resume_ms") is not None:
        parts.append(f"STOP->RESUME {row['stop_resume_ms']:.0f} ms")
    if row.get("cpu_s") is not None:
        parts.append(f"CPU {row['cpu_s']:.2f} s")
    return ", ".join(parts)


def run_grid(args: argparse.Namespace, say: Any, save: Any) -> dict[str, Any]:
    """Every point, every round, both flows; `save(results)` after each point, so an
    interrupted or overlong run still leaves what it measured (meta.complete false)."""
    from pytest_katamaran.certs import lab_certs
    from pytest_katamaran.images.guest import build_guest, cache_root
    from pytest_katamaran.qemu.binary import workload_qemu

    points = grid.expand(args.quick)
    if args.quick:
        chosen = "--quick: one point"
    elif args.point:
        points = [p for p in points if p.label in args.point]
        chosen = "--point: " + ", ".join(args.point)
    else:
        chosen = "one-factor sweeps around the base point"
    labels = {p.label for p in points}
    guest = build_guest()
    qemu, note = workload_qemu(args.qemu, cache_root())
    if note:
        say(f"bench: WARNING: {note}")
    meta: dict[str, Any] = {
        "command": "python -m pytest_katamaran.bench " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
        "machine": stats.machine(qemu=qemu.version),
        "qemu_binary": qemu.binary,
        "grid": chosen,
        "katamaran_args": list(args.katamaran_arg),
        "base": grid.BASE.as_dict(),
        "complete": False,
        "workloads": {
            "disk-writer": f"{grid.WRITER_RATE} O_DIRECT|O_DSYNC 4 KiB writes/s",
            "dirty-ram": f"{grid.DIRTY_MIB_S} MiB of guest RAM rewritten per second, page by page"
            " on a 10 ms clock (guest/memdirtier.c)",
        },
    }
    results: dict[str, Any] = {
        "meta": meta,
        "sweeps": {
            name: [label for label in sweep if label in labels]
            for name, sweep in grid.sweep_labels(args.quick).items()
        },
        "points": [],
    }
    work = Path(tempfile.mkdtemp(prefix="kmr-bench-"))
    started = time.monotonic()
    try:
        tls_dir = lab_certs(work) if any(p.tls for p in points) else None
        for n, point in enumerate(points, 1):
            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "katamaran": []}
            for r in range(args.rounds):
                order = ("bare", "katamaran") if r % 2 == 0 else ("katamaran", "bare")
                for flow in order:
                    row = measure(
                        guest,
                        point,
                        flow,
                        work / f"p{n}r{r}{flow[0]}",
                        tls_dir,
                        qemu,
                        tuple(args.katamaran_arg),
                    )
                    row["round"] = r + 1
                    runs[flow].append(row)
                    say(
                        f"bench: point {n}/{len(points)} {point.label} round "
                        f"{r + 1}/{args.rounds} {flow}: {describe(row)}"
                    )
            summary = stats.summarize(runs)
            results["points"].append(
                {
                    "point": point.as_dict(),
                    "runs": runs,
                    "summary": summary,
                    "ratios": stats.ratios(summary),
                }
            )
            meta["duration_s"] = round(time.monotonic() - started, 1)
            save(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["complete"] = True
    return results


_MAIN_PID = os.getpid()


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP (and SIGINT, even when a background shell ignored it) unwind like
    Ctrl-C: every rig's `finally` stops its QEMUs and removes its namespaces.

    Only in this process: pyroute2 forks helpers (into network namespaces) that inherit
    this handler and must die of the signal as before, not run our unwinding.
    """
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.plot_only:
            try:
                results = json.loads(args.plot_only.read_text())
            except (OSError, ValueError) as err:
                raise BenchError(f"cannot read {args.plot_only}: {err}") from None
        else:
            check_prerequisites()
            name = "bench-quick.json" if args.quick else "bench.json"

            def save(results: dict[str, Any]) -> None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / name).write_text(json.dumps(results, indent=1) + "\n")

            results = run_grid(args, say, save)
            save(results)
            say(f"bench: wrote {args.out / name}")
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            from pytest_katamaran.bench.plot import draw
        except ImportError as err:  # matplotlib is in the `test` extra
            raise BenchError(f"no pictures: {err} (pip install matplotlib)") from None
        for path in draw(results, args.out):
            say(f"bench: wrote {path}")
        table = args.out / ("bench-quick.md" if args.quick else "bench.md")
        table.write_text(stats.markdown(results))
        say(f"bench: wrote {table} (the README's tables)")
    except BenchError as err:
        say(f"bench: {err}")
        return 2
    except KeyboardInterrupt:
        say("bench: interrupted; the points finished so far are in the results JSON")
        return 130
    failed = sum(s["failed"] for p in results["points"] for s in p["summary"].values())
    if failed:
        say(f"bench: {failed} migration(s) failed (see 'error' in the JSON)")
    return 1 if failed else 0
