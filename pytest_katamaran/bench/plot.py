"""The scaling curves, drawn from the results JSON (so a picture can be redrawn later).

matplotlib with the Agg backend: no display needed, PNG and SVG from the same figure.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from pytest_katamaran.bench.stats import caption  # noqa: E402

FLOW_STYLE = {"bare": ("tab:blue", "o"), "katamaran": ("tab:orange", "s")}


def _series(
    results: dict[str, Any], sweep: str, axis: str, flow: str, metric: str
) -> tuple[list[float], list[float], list[list[float]]]:
    """x, median y and [below, above] error bars of one flow along one sweep."""
    by_label = {p["point"]["label"]: p for p in results["points"]}
    xs, ys, low, high = [], [], [], []
    for label in results["sweeps"].get(sweep, []):
        point = by_label.get(label)
        fig = point and (point["summary"].get(flow) or {}).get(metric)
        if not fig:
            continue
        xs.append(point["point"][axis])
        ys.append(fig["median"])
        low.append(fig["median"] - fig["min"])
        high.append(fig["max"] - fig["median"])
    return xs, ys, [low, high]


def _axes_sweep(ax: Any, results: dict[str, Any], sweep: str, axis: str, metric: str) -> None:
    ticks: set[float] = set()
    for flow, (color, marker) in FLOW_STYLE.items():
        xs, ys, err = _series(results, sweep, axis, flow, metric)
        ticks.update(xs)
        if xs:
            ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, capsize=3, label=flow)
    if metric == "total_s":  # the migration alone: the fixed costs apart
        for flow, (color, _) in FLOW_STYLE.items():
            xs, ys, _err = _series(results, sweep, axis, flow, "migration_s")
            if xs:
                ax.plot(xs, ys, color=color, ls="--", lw=1, label=f"{flow}: migration only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("disk size (MiB, half written)" if axis == "disk_mib" else "guest RAM (MiB)")
    ax.grid(True, alpha=0.3)
    if ticks:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """total vs disk, total vs RAM, downtime per size: PNG and SVG each; returns the paths."""
    foot = caption(results["meta"])
    written: list[Path] = []
    pictures = [
        ("total_vs_disk", [("disk", "disk_mib", "total_s", "total time (s)")]),
        ("total_vs_ram", [("ram", "ram_mib", "total_s", "total time (s)")]),
        (
            "downtime",
            [
                ("disk", "disk_mib", "downtime_ms", "QEMU downtime (ms)"),
                ("ram", "ram_mib", "downtime_ms", "QEMU downtime (ms)"),
                ("disk", "disk_mib", "stop_resume_ms", "STOP -> RESUME seen outside (ms)"),
                ("ram", "ram_mib", "stop_resume_ms", "STOP -> RESUME seen outside (ms)"),
            ],
        ),
    ]
    for name, panels in pictures:
        if not any(results["sweeps"].get(p[0]) for p in panels):
            continue
        cols = 2 if len(panels) > 1 else 1
        rows = (len(panels) + cols - 1) // cols
        width = 6.5 * cols if cols > 1 else 8.5
        fig, axes = plt.subplots(rows, cols, figsize=(width, 4.2 * rows + 0.4), squeeze=False)
        for ax, (sweep, axis, metric, ylabel) in zip(axes.flat, panels, strict=True):
            _axes_sweep(ax, results, sweep, axis, metric)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
        title = {
            "total_vs_disk": "Migration total time vs disk size: bare QMP vs katamaran",
            "total_vs_ram": "Migration total time vs guest RAM: bare QMP vs katamaran",
            "downtime": "Pause per size: QEMU's downtime and the STOP->RESUME gap",
        }[name]
        fig.suptitle(title)
        footer = "\n".join(textwrap.wrap(foot, int(width * 16)))
        fig.text(0.5, 0.005, footer, ha="center", va="bottom", fontsize=7)
        fig.tight_layout(rect=(0, 0.06 if cols == 1 else 0.03, 1, 0.97))
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written
