"""One migration of one grid point by one flow, on a fresh pair of VMs, measured."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pytest_katamaran.bench.flows import FLOWS, FlowFailed
from pytest_katamaran.bench.grid import DIRTY_MIB_S, WRITER_RATE, Point
from pytest_katamaran.bench.observer import Observer, phases
from pytest_katamaran.bench.stats import derive
from pytest_katamaran.images.guest import GuestImage
from pytest_katamaran.lab.local import Rig
from pytest_katamaran.qemu.binary import WorkloadQemu


def make_rig(
    guest: GuestImage, point: Point, workdir: Path, qemu: WorkloadQemu | None = None
) -> Rig:
    """The lab for `point`: both QEMUs (`qemu`, else the system's) with a second monitor
    for the observer."""
    return Rig(
        guest,
        workdir,
        writer=point.workload == "disk-writer",
        writer_rate=WRITER_RATE if point.workload == "disk-writer" else None,
        dirty_mib_s=DIRTY_MIB_S if point.workload == "dirty-ram" else 0,
        shared=point.shared,
        disk_mib=point.disk_mib,
        fill_mib=point.fill_mib,
        memory_mib=point.ram_mib,
        extra_monitor=True,
        qemu=qemu,
    )


def measure(
    guest: GuestImage,
    point: Point,
    flow: str,
    workdir: Path,
    tls_dir: Path | None,
    qemu: WorkloadQemu | None = None,
    katamaran_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The figures of one migration, or {"error": ...} if it failed (the run goes on).

    `katamaran_args` go to both katamaran processes (the bare flow has no flags).

    Everything the rig started (QEMUs, katamaran, netns, disks) is gone on return.
    """
    workdir.mkdir(parents=True)
    rig = make_rig(guest, point, workdir, qemu)
    try:
        rig.up()
        observer = Observer(rig.src.spec.qmp_path, rig.dst.spec.qmp_path).start()
        try:
            row = FLOWS[flow](rig, tls_dir if point.tls else None, katamaran_args)
        finally:
            seen = observer.stop()
        state = rig.status(rig.dst)
        if state != "running":
            raise FlowFailed(f"destination VM is {state!r} after the migration, not running")
        row = derive({**row, **phases(seen)})
        for key in ("total_s", "dest_prep_s", "startup_s"):
            if row.get(key) is not None:
                row[key] = round(row[key], 4)
        return row
    except Exception as err:  # noqa: BLE001 - one failed round is a figure, not the end
        text = f"{type(err).__name__}: {err}"
        return {"error": text[:3000]}
    finally:
        rig.down()
        shutil.rmtree(workdir, ignore_errors=True)
