"""The switchover gate (katamaran/gate.py) against real QEMU 10.0: an idle VM, which
QEMU pauses by itself at the first dirty sync that finds nothing dirty, waits after its
first RAM pass, running, until the gate is opened; the destination gets the bitmap and
katamaran's removal leaves none on either side.

The VM has no OS (firmware only): nothing dirties its RAM, the worst case for the gate.
Its settings are katamaran's own while it decides the switchover (1 ms, 1000 B/s).
The host's QEMU is 7.2 (no avail-switchover-bandwidth): backports' 10.0 runs both sides.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from katamaran import gate, migration
from katamaran.qmp import Monitor
from katamaran.source import DRAIN_MAX_BANDWIDTH
from pytest_katamaran.lab.local import wait_for_path
from pytest_katamaran.qemu.binary import WorkloadQemu

pytestmark = pytest.mark.qemu

HELD_S = 3.0  # how long the gated VM is watched at the gate
DRIVE = "drive-virtio-disk0"


def _start(qemu: WorkloadQemu, tmp: Path, name: str, *extra: str) -> subprocess.Popen:
    disk = tmp / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return subprocess.Popen(
        [qemu.binary, "-L", qemu.datadir, "-nodefaults", "-display", "none"]
        + ["-machine", "q35,accel=tcg", "-m", "128"]
        # -drive, as Kata and the lab's pod: the nodes get auto-generated names
        + ["-drive", f"if=none,id={DRIVE},format=qcow2,file={disk}"]
        + ["-device", f"virtio-blk-pci,drive={DRIVE},id=vblk0"]
        + ["-qmp", f"unix:{tmp / name}.sock,server=on,wait=off", *extra],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / f"{name}.log").open("w"),
    )


async def _connect(tmp: Path, name: str) -> Monitor:
    sock = tmp / f"{name}.sock"
    wait_for_path(sock, 30)
    mon = Monitor(sock, 30)
    await mon.connect()
    return mon


async def _migration(mon: Monitor) -> dict:
    return await mon.execute("query-migrate")


async def _bitmaps(mon: Monitor) -> list[str]:
    nodes = await mon.execute("query-named-block-nodes", {"flat": True})
    return [b.get("name") for n in nodes for b in n.get("dirty-bitmaps") or []]


async def _mirror(src: Monitor, tmp: Path) -> None:
    """A READY mirror of the VM's disk, as in katamaran's NBD mode (its bitmap is
    unnamed: the gate must neither refuse it nor migrate it)."""
    target = tmp / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), "64M"], check=True)
    await src.execute(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "target",
            "file": {"driver": "file", "filename": str(target)},
        },
    )
    mark = src.mark()
    await src.execute(
        "blockdev-mirror",
        {"job-id": "mirror", "device": DRIVE, "target": "target", "sync": "full"},
    )
    await src.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY", 60, mark)


async def _migrate(
    qemu: WorkloadQemu, tmp: Path, gated: bool, mirror: bool = False, cancel: bool = False
) -> dict:
    """Migrate the idle VM with katamaran's decision settings; what was seen."""
    seen: dict = {"held": []}
    procs = [_start(qemu, tmp, "src"), _start(qemu, tmp, "dst", "-incoming", "defer")]
    src = dst = None
    try:
        src, dst = await _connect(tmp, "src"), await _connect(tmp, "dst")
        await dst.execute("migrate-incoming", {"uri": f"unix:{tmp / 'mig.sock'}"})
        await src.execute(
            "migrate-set-parameters",
            {
                "downtime-limit": migration.OWN_SWITCHOVER_LIMIT_MS,
                "avail-switchover-bandwidth": migration.OWN_SWITCHOVER_BANDWIDTH,
                "max-bandwidth": migration.UNCAPPED,
            },
        )
        closed = None
        if gated:  # as katamaran: the bitmap before the mirror, the gate closed after
            closed, why = await gate.SwitchoverGate.place(src, DRIVE)
            assert closed is not None, why
            assert closed.pending == 1  # a 64 MiB disk, 2 GiB granularity
        if mirror:
            await _mirror(src, tmp)
        if closed is not None:
            await closed.close()
        mark = src.mark()
        await src.execute("migrate", {"uri": f"unix:{tmp / 'mig.sock'}"})
        deadline = time.monotonic() + 60
        while not gate.waits_at_gate(info := await _migration(src)):
            if info["status"] not in ("setup", "active") or time.monotonic() > deadline:
                seen["first"] = info
                break
            await asyncio.sleep(0.05)
        if closed is not None:
            # as katamaran does at the gate: QEMU's migration thread spins there (a core at
            # 100 %, beside the suite's other tests under -n 2) until the bandwidth is capped
            await src.execute("migrate-set-parameters", {"max-bandwidth": DRAIN_MAX_BANDWIDTH})
            until = time.monotonic() + HELD_S
            while time.monotonic() < until:
                info = await _migration(src)
                status = (await src.execute("query-status"))["status"]
                seen["held"].append((gate.waits_at_gate(info), status))
                await asyncio.sleep(0.1)
            seen["stops_while_held"] = sum(e["event"] == "STOP" for e in src.history[mark:])
            if cancel:  # katamaran's abort at the gate, then its cleanup
                await src.execute("migrate_cancel")
                while (await _migration(src))["status"] != "cancelled":
                    assert time.monotonic() < deadline + HELD_S, "migrate_cancel did not end it"
                    await asyncio.sleep(0.05)
                await closed.remove()
                caps = [{"capability": gate.CAPABILITY, "state": False}]
                await src.execute("migrate-set-capabilities", {"capabilities": caps})
                seen["src_left"] = await _bitmaps(src)
                seen["status"] = (await src.execute("query-status"))["status"]
                return seen
            opened = {"downtime-limit": closed.open_limit(), "max-bandwidth": migration.UNCAPPED}
            await src.execute("migrate-set-parameters", opened)
        deadline = time.monotonic() + 60
        while (info := await _migration(src))["status"] != "completed":
            assert info["status"] in ("active", "device"), info
            assert time.monotonic() < deadline, f"no completion: {info}"
            await asyncio.sleep(0.05)
        seen["syncs"] = info["ram"]["dirty-sync-count"]
        seen["elapsed_ms"] = info.get("total-time")
        if closed is not None:
            seen["dest_removed"] = await gate.remove_all(dst)
            seen["dest_left"] = await _bitmaps(dst)
            await closed.remove()
            seen["src_left"] = await _bitmaps(src)
        return seen
    finally:
        for mon in (src, dst):
            if mon is not None:
                await mon.close()
        for proc in procs:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("mirror", [False, True], ids=["shared", "mirrored"])
def test_an_idle_vm_waits_at_the_gate_running_until_it_is_opened(qemu_backports, tmp_path, mirror):
    seen = asyncio.run(_migrate(qemu_backports, tmp_path, gated=True, mirror=mirror))
    assert "first" not in seen, f"QEMU never reached the gate: {seen.get('first')}"
    assert len(seen["held"]) >= 10
    assert {status for _, status in seen["held"]} == {"running"}, seen["held"]
    assert all(at for at, _ in seen["held"]), "QEMU left the gate by itself"
    assert seen["stops_while_held"] == 0
    assert len(seen["dest_removed"]) == 1, "the bitmap did not come with the VM"
    assert gate.BITMAP not in seen["dest_left"] and gate.BITMAP not in seen["src_left"]


def test_without_the_gate_qemu_pauses_the_idle_vm_right_after_its_first_pass(
    qemu_backports, tmp_path
):
    """The control: what the gate prevents.  The same VM and settings, no bitmap, and
    nobody raises the limit: QEMU completes by itself within a sync or two."""
    seen = asyncio.run(_migrate(qemu_backports, tmp_path, gated=False))
    assert seen["syncs"] <= 3, seen


def test_a_migration_cancelled_at_the_gate_leaves_the_vm_running_and_no_bitmap(
    qemu_backports, tmp_path
):
    """katamaran's abort while QEMU waits at the gate (a signal, a timeout): QEMU lets the
    bitmap go once the migration is cancelled, and the capability can be put back."""
    seen = asyncio.run(_migrate(qemu_backports, tmp_path, gated=True, cancel=True))
    assert all(at for at, _ in seen["held"]), seen["held"]
    assert seen["status"] == "running"
    assert gate.BITMAP not in seen["src_left"], seen["src_left"]
