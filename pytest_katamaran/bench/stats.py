"""Medians and spread over rounds, the ratios, and the machine the figures came from."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any

METRICS = (
    "total_s",
    "migration_s",
    "fixed_s",
    "storage_sync_s",
    "ram_s",
    "downtime_ms",
    "stop_resume_ms",
    "stop_pause_ms",
    "switchover_ms",
    "send_load_ms",
    "ram_bytes",
    "disk_bytes",
    "cpu_s",
    "startup_s",
    "dest_prep_s",
    "tunnel_hold_s",
    "tail_s",
)


def derive(row: dict[str, Any]) -> dict[str, Any]:
    """Figures computed from a row's marks: fixed_s (total minus the migration) and
    tail_s (destination VM running -> flow finished: processes exiting, cleanup)."""
    out = dict(row)
    if out.get("fixed_s") is None and None not in (out.get("total_s"), out.get("migration_s")):
        out["fixed_s"] = round(out["total_s"] - out["migration_s"], 4)
    if out.get("tail_s") is None and None not in (out.get("end"), out.get("resume_at")):
        out["tail_s"] = round(out["end"] - out["resume_at"], 4)
    return out


def spread(values: list[float | None]) -> dict[str, float] | None:
    """Median, min, max and count of the values that exist (None: none did)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "median": statistics.median(present),
        "min": min(present),
        "max": max(present),
        "n": len(present),
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """flow -> metric -> spread, over the rounds that succeeded (failed ones are counted)."""
    out: dict[str, dict[str, Any]] = {}
    for flow, rows in runs.items():
        good = [derive(r) for r in rows if not r.get("error")]
        out[flow] = {m: spread([r.get(m) for r in good]) for m in METRICS}
        out[flow]["failed"] = len(rows) - len(good)
    return out


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """katamaran / bare of the medians (None where either is missing or zero)."""
    out: dict[str, float | None] = {}
    for metric in ("total_s", "migration_s", "downtime_ms", "stop_resume_ms"):
        k = (summary.get("katamaran") or {}).get(metric)
        b = (summary.get("bare") or {}).get(metric)
        out[metric] = round(k["median"] / b["median"], 3) if k and b and b["median"] else None
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(qemu: str, accel: str = "tcg") -> dict[str, Any]:
    """What the figures depend on: CPU, cores, QEMU (the version the flows ran),
    accelerator, kernel, load."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "qemu": qemu,
        "accel": accel,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def caption(meta: dict[str, Any]) -> str:
    """One line for a picture's footer: the machine, the date, katamaran's extra flags."""
    m = meta["machine"]
    flags = " ".join(meta.get("katamaran_args") or [])
    return (
        f"{m['cpu']}, {m['cores']} cores, QEMU {m['qemu']} ({m['accel']}), "
        f"load {m['loadavg'][0]:g} at start; {meta['date']}; "
        f"median of {meta['rounds']} round(s), bars: min-max"
        + (f"; katamaran {flags}" if flags else "")
    )


def _cell(fig: dict[str, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if not fig:
        return "–"
    med, lo, hi = (fig[k] * scale for k in ("median", "min", "max"))
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _ratio(k: dict[str, float] | None, b: dict[str, float] | None) -> str:
    return f"{k['median'] / b['median']:.2f}×" if k and b and b["median"] else "–"


def markdown(results: dict[str, Any]) -> str:
    """The README's tables: median (min–max) per point, bare vs katamaran."""
    rows_time = [
        "| point | bare total s | katamaran total s | ratio | bare migration s "
        "| katamaran migration s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    rows_pause = [
        "| point | bare downtime ms | katamaran downtime ms | bare STOP→RESUME ms "
        "| katamaran STOP→RESUME ms |",
        "|---|---|---|---|---|",
    ]
    rows_split = [
        "| point | STOP→pre-switchover ms (bare / katamaran) "
        "| pre-switchover→device ms (bare / katamaran) "
        "| device→RESUME ms (bare / katamaran) |",
        "|---|---|---|---|",
    ]
    rows_fixed = [
        "| point | start-up s | destination ready s | after RESUME s | tunnel hold s "
        "| CPU s (both processes) |",
        "|---|---|---|---|---|---|",
    ]
    for point in results["points"]:
        label = point["point"]["label"]
        b, k = point["summary"].get("bare", {}), point["summary"].get("katamaran", {})
        failed = b.get("failed", 0) + k.get("failed", 0)
        if failed:
            label += f" ({failed} failed)"
        rows_time.append(
            f"| {label} | {_cell(b.get('total_s'))} | {_cell(k.get('total_s'))} "
            f"| {_ratio(k.get('total_s'), b.get('total_s'))} | {_cell(b.get('migration_s'))} "
            f"| {_cell(k.get('migration_s'))} "
            f"| {_ratio(k.get('migration_s'), b.get('migration_s'))} |"
        )
        rows_pause.append(
            f"| {label} | {_cell(b.get('downtime_ms'), digits=0)} "
            f"| {_cell(k.get('downtime_ms'), digits=0)} "
            f"| {_cell(b.get('stop_resume_ms'), digits=0)} "
            f"| {_cell(k.get('stop_resume_ms'), digits=0)} |"
        )
        rows_split.append(
            f"| {label} | "
            + " | ".join(
                f"{_cell(b.get(m), digits=1)} / {_cell(k.get(m), digits=1)}"
                for m in ("stop_pause_ms", "switchover_ms", "send_load_ms")
            )
            + " |"
        )
        rows_fixed.append(
            f"| {label} | {_cell(k.get('startup_s'))} | {_cell(k.get('dest_prep_s'))} "
            f"| {_cell(k.get('tail_s'))} | {_cell(k.get('tunnel_hold_s'))} "
            f"| {_cell(k.get('cpu_s'))} |"
        )
    tables = (rows_time, rows_pause, rows_split, rows_fixed)
    return "\n\n".join("\n".join(t) for t in tables) + "\n"
