"""katamaran.tapqueue against a real QEMU in a Kata-shaped pod: frames queued on tap0_kata.

Why: the source's switchover waits for this queue to empty before it pauses the VM; a
frame left there would die with the source QEMU.  Here the VM is paused by hand, pings
pile up on its tap, and the watcher must see them, then see the queue empty once the VM
runs again.
"""

from __future__ import annotations

import subprocess

import pytest

from katamaran.tapqueue import TapQueues, tap_fds
from pytest_katamaran.locallab import VM_IP, qmp

pytestmark = pytest.mark.qemu


def test_tap_queue_is_seen_while_paused_and_empties_when_running(rig_factory):
    rig = rig_factory(kata_pod=True)
    rig.up()
    pid = rig.src.pid
    assert pid is not None
    assert "tap0_kata" in tap_fds(pid).values()
    queues = TapQueues.of(pid)
    try:
        assert queues.names == ["tap0_kata"]
        assert queues.wait_empty(5.0) == [], "a running VM left frames on its tap"

        qmp(rig.src.qmp_path, "stop")
        ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
        lost = rig.lab.run("a", ping, capture_output=True, text=True)
        assert lost.returncode != 0, f"a paused VM answered: {lost.stdout}"
        assert queues.queued() == ["tap0_kata"], "pings to the paused VM are not on its tap"
        assert queues.wait_empty(0.3) == ["tap0_kata"]

        qmp(rig.src.qmp_path, "cont")
        assert queues.wait_empty(10.0) == [], "the resumed VM did not read its tap"
    finally:
        queues.close()
    assert not queues.fds
    again = rig.lab.run("a", ["ping", "-c", "2", "-W", "5", VM_IP], stdout=subprocess.DEVNULL)
    assert again.returncode == 0, "the VM stopped answering after being watched"


def test_no_tap_means_nothing_to_watch():
    """A process without tun fds (this test itself) yields an empty watcher."""
    import os

    queues = TapQueues.of(os.getpid())
    assert queues.fds == {} and queues.queued() == [] and queues.wait_empty(0.1) == []


def test_switchover_mode_follows_qemu_version_and_accelerator(tmp_path):
    """katamaran decides the pause only where extra RAM passes are safe (KVM or 9.0+)."""
    import asyncio
    import time

    from katamaran import migration
    from katamaran.qmp import Monitor

    sock = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-accel", "tcg", "-display", "none"]
        + ["-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        async def ask() -> tuple[bool, tuple[int, int]]:
            mon = Monitor(sock, 30)
            await mon.connect()
            try:
                version = (await mon.execute("query-version"))["qemu"]
                reliable = await migration.tcg_dirty_tracking_is_reliable(mon)
                return reliable, (version["major"], version["minor"])
            finally:
                await mon.close()

        reliable, version = asyncio.run(ask())
        assert reliable == (version >= (9, 0)), (version, reliable)
    finally:
        qemu.kill()
        qemu.wait()
