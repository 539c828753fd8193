"""The two ways the benchmark moves a VM: the bare QMP sequence and the katamaran CLI.

Both run against a `Rig` that is up (source running, destination `-incoming defer`) and
return the wall-clock marks (time.time(), the clock QEMU stamps its events with) that
the fixed costs are computed from; the migration's phases come from the observer.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from katamaran.config import DOWNTIME_LIMIT_MS, MIGRATION_PORT, NBD_PORT
from katamaran.migration import UNCAPPED
from katamaran.qmp import Monitor, migration_status, named
from pytest_katamaran.lab.local import Rig

DEST_IP = "10.0.0.2"  # node b's address in the HostLab
TLS_ID = "bench-tls"
JOB = "bench-mirror"
TARGET = "bench-nbd"
TIMEOUT = 600.0


class FlowFailed(AssertionError):
    """A migration of either flow did not complete (the round is recorded as failed)."""


async def _wait(mon: Monitor, match: Any, since: int, what: str) -> dict[str, Any]:
    try:
        return await mon.wait_event(match, TIMEOUT, since)
    except TimeoutError:
        raise FlowFailed(f"bare: no {what} within {TIMEOUT:g} s") from None


async def _bare(rig: Rig, tls_dir: Path | None) -> dict[str, Any]:
    """The minimal correct sequence an operator would type (QEMU 7.2's QMP).

    Destination: NBD server on its node address, the VM's own drive exported writable,
    `migrate-incoming`.  Source: `events` (to wait for MIGRATION instead of polling)
    and, with NBD, `pause-before-switchover` (so the mirror is drained while the VM is
    paused and before the destination resumes: without it the destination can run on a
    disk missing the last writes); an NBD node, `blockdev-mirror` (drive-mirror's
    `nbd:` filename cannot carry tls-creds; the job is the same), wait READY, the same
    migration parameters katamaran sets (downtime-limit, uncapped bandwidth: the
    comparison is of the flows, not of the limits), `migrate`, at `pre-switchover`
    `block-job-cancel` (graceful: drains and completes), `migrate-continue`.  Shared
    storage: migrate only.  TLS: one `tls-creds-x509` per side on both streams.
    It ends when the destination VM runs (RESUME), as katamaran's destination does.
    """
    marks: dict[str, Any] = {"start": time.time()}
    nbd = not rig.shared
    src, dst = Monitor(rig.src.qmp_path, 30), Monitor(rig.dst.qmp_path, 30)
    await src.connect()
    await dst.connect()
    try:
        tls_nbd: dict[str, str] = {}
        tls_mig: dict[str, str] = {}
        if tls_dir is not None:
            for mon, endpoint in ((dst, "server"), (src, "client")):
                await mon.execute(
                    "object-add",
                    {
                        "qom-type": "tls-creds-x509",
                        "id": TLS_ID,
                        "dir": str(tls_dir),
                        "endpoint": endpoint,
                        "verify-peer": True,
                    },
                )
            await dst.execute("migrate-set-parameters", {"tls-creds": TLS_ID})
            tls_nbd = {"tls-creds": TLS_ID, "tls-hostname": DEST_IP}
            tls_mig = {"tls-creds": TLS_ID, "tls-hostname": DEST_IP}
        if nbd:
            addr = {"type": "inet", "data": {"host": DEST_IP, "port": str(NBD_PORT)}}
            server: dict[str, Any] = {"addr": addr}
            if tls_dir is not None:
                server["tls-creds"] = TLS_ID
            await dst.execute("nbd-server-start", server)
            blocks = await dst.execute("query-block")
            drive = rig.dst.spec.drive_id
            node = next(b["inserted"]["node-name"] for b in blocks if b["device"] == drive)
            await dst.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": "bench-export",
                    "node-name": node,
                    "name": drive,
                    "writable": True,
                },
            )
        await dst.execute("migrate-incoming", {"uri": f"tcp:{DEST_IP}:{MIGRATION_PORT}"})
        marks["dest_ready"] = time.time()
        caps = [{"capability": "events", "state": True}]
        if nbd:
            caps.append({"capability": "pause-before-switchover", "state": True})
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        drive = rig.src.spec.drive_id
        if nbd:
            await src.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": TARGET,
                    "server": {"type": "inet", "host": DEST_IP, "port": str(NBD_PORT)},
                    "export": drive,
                    **tls_nbd,
                },
            )
            mark = src.mark()
            await src.execute(
                "blockdev-mirror",
                {"job-id": JOB, "device": drive, "target": TARGET, "sync": "full"},
            )
            await _wait(src, named("BLOCK_JOB_READY", device=JOB), mark, "BLOCK_JOB_READY")
        await src.execute(
            "migrate-set-parameters",
            {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": UNCAPPED, **tls_mig},
        )
        mark, resumed = src.mark(), dst.mark()
        await src.execute("migrate", {"uri": f"tcp:{DEST_IP}:{MIGRATION_PORT}"})
        ends = ("completed", "failed", "cancelled")
        if nbd:
            event = await _wait(src, migration_status("pre-switchover", *ends), mark, "MIGRATION")
            if event["data"]["status"] != "pre-switchover":
                raise FlowFailed(f"bare: migration {event['data']['status']}")
            done = src.mark()
            await src.execute("block-job-cancel", {"device": JOB})
            await _wait(src, named("BLOCK_JOB_COMPLETED", device=JOB), done, "mirror end")
            await src.execute("migrate-continue", {"state": "pre-switchover"})
        event = await _wait(src, migration_status(*ends), mark, "MIGRATION end")
        if event["data"]["status"] != "completed":
            raise FlowFailed(f"bare: migration {event['data']['status']}")
        await _wait(dst, named("RESUME"), resumed, "RESUME on the destination")
        if nbd:
            await src.execute("blockdev-del", {"node-name": TARGET})
            await dst.execute("nbd-server-stop")
        marks["end"] = time.time()
        return marks
    finally:
        await src.close()
        await dst.close()


def bare(rig: Rig, tls_dir: Path | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The bare QMP sequence; marks: start, dest_ready, end.  No processes: no CPU figure.
    `extra` (katamaran's flags, the bench's --katamaran-arg) has nothing to go to here."""
    marks = asyncio.run(_bare(rig, tls_dir))
    return {
        "total_s": marks["end"] - marks["start"],
        "dest_prep_s": marks["dest_ready"] - marks["start"],
        "startup_s": 0.0,
        "tunnel_hold_s": 0.0,
        "cpu_s": None,
        "start": marks["start"],
        "end": marks["end"],
    }


def reap(proc: subprocess.Popen, timeout: float) -> tuple[int, resource.struct_rusage]:
    """Wait for `proc` with os.wait4: its exit code and its own CPU use (rusage)."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def _first_line(rig: Rig, log: str) -> float | None:
    lines = rig.stamps.get(log) or []
    return lines[0][0] if lines else None


def katamaran(rig: Rig, tls_dir: Path | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """`katamaran -mode dest` until it says ready, then `-mode source`, tunnel hold 0;
    `extra` flags go to both (the bench's --katamaran-arg).

    Fixed costs: startup_s is each process's spawn -> first output line (Python start,
    imports, QMP connect), dest_prep_s the destination's spawn -> `destination ready`.
    """
    tls = ["-tls", "-tls-dir", str(tls_dir)] if tls_dir is not None else []
    hold = ["-tunnel-hold", "0"]
    start = time.time()
    dest = rig.start_dest(*hold, *tls, *extra)
    ready = rig.wait_for_line("dest.log", "destination ready", 1, dest)
    src_spawn = time.time()
    source = rig.start_source(DEST_IP, *hold, *tls, *extra)
    src_rc, src_use = reap(source, TIMEOUT)
    dst_rc, dst_use = reap(dest, 60)
    end = time.time()
    for proc in (source, dest):
        rig.copiers[proc.pid].join(5)
    if src_rc != 0 or dst_rc != 0:
        raise FlowFailed(
            f"katamaran exited source={src_rc} dest={dst_rc}\n"
            f"source:\n{rig.log('source.log')}\ndest:\n{rig.log('dest.log')}"
        )
    firsts = (_first_line(rig, "dest.log"), _first_line(rig, "source.log"))
    startup = None
    if None not in firsts:
        startup = (firsts[0] - start) + (firsts[1] - src_spawn)  # type: ignore[operator]
    cpu = sum(u.ru_utime + u.ru_stime for u in (src_use, dst_use))
    return {
        "total_s": end - start,
        "dest_prep_s": ready - start,
        "startup_s": startup,
        "tunnel_hold_s": 0.0,
        "cpu_s": round(cpu, 3),
        "start": start,
        "end": end,
    }


FLOWS = {"bare": bare, "katamaran": katamaran}
