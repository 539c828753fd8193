"""Which migrations the benchmark runs: one-factor sweeps around a base point.

Why one-factor: the full product of five factors is hundreds of points (hours under
TCG); moving one factor at a time from a base point shows how each one scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

WORKLOADS = ("idle", "disk-writer", "dirty-ram")
DISK_SIZES_MIB = (64, 256, 512, 1024, 2048)
RAM_SIZES_MIB = (128, 256, 512, 1024, 2048)
WRITER_RATE = 200  # 4 KiB O_DIRECT|O_DSYNC writes/s of the disk-writer workload
DIRTY_MIB_S = 16  # MiB of guest RAM rewritten per second by the dirty-ram workload


@dataclass(frozen=True)
class Point:
    """One configuration of the migrated VM; half of the disk holds data (fill)."""

    disk_mib: int = 512
    ram_mib: int = 512
    workload: str = "idle"
    shared: bool = False
    tls: bool = False

    @property
    def fill_mib(self) -> int:
        return self.disk_mib // 2

    @property
    def label(self) -> str:
        storage = "shared" if self.shared else "nbd"
        tls = "+tls" if self.tls else ""
        return f"disk{self.disk_mib}-ram{self.ram_mib}-{self.workload}-{storage}{tls}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fill_mib": self.fill_mib, "label": self.label}


BASE = Point()
QUICK = Point(disk_mib=64, ram_mib=128)


def sweeps(base: Point = BASE) -> dict[str, list[Point]]:
    """Each factor's sweep (the base point is in every one)."""
    return {
        "disk": [replace(base, disk_mib=d) for d in DISK_SIZES_MIB],
        "ram": [replace(base, ram_mib=r) for r in RAM_SIZES_MIB],
        "workload": [replace(base, workload=w) for w in WORKLOADS],
        "storage": [base, replace(base, shared=True)],
        "tls": [base, replace(base, tls=True)],
    }


def expand(quick: bool = False) -> list[Point]:
    """The points to run, each once, in sweep order (--quick: the smallest base point)."""
    if quick:
        return [QUICK]
    seen: dict[Point, None] = {}
    for points in sweeps().values():
        for point in points:
            seen.setdefault(point, None)
    return list(seen)


def sweep_labels(quick: bool = False) -> dict[str, list[str]]:
    """sweep name -> point labels, as the results JSON and the plots name them."""
    if quick:
        return {"disk": [QUICK.label], "ram": [QUICK.label]}
    return {name: [p.label for p in points] for name, points in sweeps().items()}
