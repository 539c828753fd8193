"""What QEMU itself says happened, seen from a monitor neither flow uses.

Why a second monitor: the STOP->RESUME gap must be measured the same way for both
flows and from outside them.  QEMU stamps every event with its own wall clock, and both
QEMUs run on this host, so the source's STOP and the destination's RESUME share a clock
(no observer latency in the figure).  The lab starts each QEMU with two monitors
(`Rig(extra_monitor=True)`): the flows drive the extra one, the observer listens on the
primary, as an operator's tool would next to Kata's shim.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from katamaran.qmp import Event, Monitor


def stamp(event: Event) -> float:
    """QEMU's own timestamp of an event, in seconds since the epoch."""
    ts = event.get("timestamp", {})
    return ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6


@dataclass
class Observed:
    """Both QEMUs' event histories and the source's final `query-migrate`."""

    source: list[Event] = field(default_factory=list)
    dest: list[Event] = field(default_factory=list)
    query_migrate: dict[str, Any] = field(default_factory=dict)


class Observer:
    """Listens on both QEMUs from a thread of its own until `stop()`."""

    def __init__(self, source_qmp: Path, dest_qmp: Path) -> None:
        self.paths = (source_qmp, dest_qmp)
        self.result = Observed()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="bench-observer")

    def start(self, timeout: float = 30) -> Observer:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error:
            self._stop.set()
            raise RuntimeError(f"observer could not connect: {self._error}")
        return self

    def stop(self, timeout: float = 60) -> Observed:
        self._stop.set()
        self._thread.join(timeout)
        if self._error:
            raise RuntimeError(f"observer failed: {self._error}")
        return self.result

    def _main(self) -> None:
        try:
            asyncio.run(self._watch())
        except BaseException as err:  # reported by start()/stop()
            self._error = err
            self._ready.set()

    async def _watch(self) -> None:
        src, dst = Monitor(self.paths[0], 30), Monitor(self.paths[1], 30)
        await src.connect()
        try:
            await dst.connect()
            try:
                self._ready.set()
                while not self._stop.is_set():
                    await asyncio.sleep(0.02)
                self.result.query_migrate = await src.execute("query-migrate")
                await asyncio.sleep(0.05)  # events already sent are pumped into history
                self.result.source = list(src.history)
                self.result.dest = list(dst.history)
            finally:
                await dst.close()
        finally:
            await src.close()


def _first(events: list[Event], name: str, after: float = 0.0, **data: Any) -> float | None:
    for event in events:
        if event.get("event") != name or stamp(event) < after:
            continue
        payload = event.get("data", {})
        if all(payload.get(k) == v for k, v in data.items()):
            return stamp(event)
    return None


def phases(seen: Observed) -> dict[str, float | None]:
    """The migration's phases from QEMU's events (None: that phase did not happen).

    storage_sync_s: mirror job created -> ready; ram_s: migration active -> source STOP
    (the pre-copy); stop_resume_ms: source STOP -> destination RESUME; migration_s:
    first migration event on the source (mirror created, else migration setup) ->
    destination RESUME.  downtime_ms and the RAM bytes are QEMU's own (query-migrate);
    disk bytes are what the mirror job reports at its end.

    Where the pause goes (with `pause-before-switchover`; None without it): stop_pause_ms,
    STOP -> `pre-switchover` (QEMU stops the vCPUs, drains and flushes the disks);
    switchover_ms, `pre-switchover` -> `device` (the controller's part: its wake-up, the
    mirror's end, `migrate-continue`); send_load_ms, `device` -> destination RESUME (the
    last RAM and the device state sent, loaded, the VM started).
    """
    src, dst = seen.source, seen.dest
    created = _first(src, "JOB_STATUS_CHANGE", status="created")
    ready = _first(src, "JOB_STATUS_CHANGE", status="ready")
    setup = _first(src, "MIGRATION", status="setup")
    active = _first(src, "MIGRATION", status="active")
    stop = _first(src, "STOP", after=active or 0.0)
    resume = _first(dst, "RESUME", after=stop or 0.0) if stop else None
    paused = _first(src, "MIGRATION", after=stop or 0.0, status="pre-switchover") if stop else None
    device = _first(src, "MIGRATION", after=paused or 0.0, status="device") if paused else None
    start = created if created is not None else setup
    disk_bytes = 0
    for event in src:
        if event.get("event") == "BLOCK_JOB_COMPLETED":
            disk_bytes = event.get("data", {}).get("offset", 0)
    qm = seen.query_migrate
    ram = qm.get("ram", {})

    def gap(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
        return None if a is None or b is None else round((b - a) * scale, 4)

    return {
        "storage_sync_s": gap(created, ready),
        "ram_s": gap(active, stop),
        "stop_resume_ms": gap(stop, resume, 1000),
        "stop_pause_ms": gap(stop, paused, 1000),
        "switchover_ms": gap(paused, device, 1000),
        "send_load_ms": gap(device, resume, 1000),
        "migration_s": gap(start, resume),
        "downtime_ms": qm.get("downtime"),
        "ram_bytes": ram.get("transferred"),
        "disk_bytes": disk_bytes,
        "migration_start": start,
        "resume_at": resume,
    }
