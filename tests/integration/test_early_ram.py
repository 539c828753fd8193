"""-early-ram: `migrate` starts while the disk is still mirrored, and the switchover gate
holds QEMU after its first RAM pass until the mirror is READY.

QEMU 10 from Debian backports (the gate needs 8.2+, and 9.0+ under TCG; the host's 7.2
synchronizes the disk first, as without the flag).  The mirror is held deterministically,
not raced: a blkdebug breakpoint under the source drive suspends the mirror's first read
(HMP `qemu-io ... "break read_aio"`), so the disk cannot be READY until the test resumes
that read.  The guest is idle: a guest read would hit the breakpoint too.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from pytest_katamaran.lab.local import wait_for_text
from tests.integration.test_faults import assert_source_clean, one_error, settings, status, watch

pytestmark = pytest.mark.qemu

DRIVE = "drive-virtio-disk0"


def hmp(box, line: str) -> object:
    """An HMP line on the primary monitor (katamaran holds the extra one)."""
    return watch(box, "human-monitor-command", **{"command-line": line})


HELD = "first RAM pass sent before the disk: held at the switchover gate"


def held_mirror(rig_factory, qemu_backports, tmp_path):
    """A source katamaran with -early-ram whose RAM pass is done while its mirror is
    stuck on its first read (the blkdebug breakpoint `early`)."""
    rules = tmp_path / "none.conf"
    rules.write_text("")  # blkdebug only for its breakpoints: no rule
    rig = rig_factory(
        qemu=qemu_backports, extra_monitor=True, disk_format="raw", blkdebug=rules, fill_mib=32
    )
    rig.up()
    before = settings(rig.src)
    assert hmp(rig.src, f'qemu-io {DRIVE} "break read_aio early"') == ""
    dest = rig.start_dest()
    source = rig.start_source("10.0.0.2", "-early-ram")
    wait_for_text(rig.tmp / "source.log", HELD, 120, source)
    return rig, before, dest, source


def test_early_ram_overlaps_the_mirror_and_waits_at_the_gate_for_ready(
    rig_factory, qemu_backports, tmp_path
):
    rig, _, dest, source = held_mirror(rig_factory, qemu_backports, tmp_path)
    # The mirror is stuck on its first read; the RAM pass is done; QEMU waits, VM running.
    (job,) = watch(rig.src, "query-block-jobs")
    assert not job["ready"] and job["offset"] < job["len"], job
    info = watch(rig.src, "query-migrate")
    assert info["status"] == "active", info
    assert info["ram"]["dirty-sync-count"] == 1 and info["ram"]["remaining"] == 0, info
    assert watch(rig.src, "query-status")["status"] == "running"
    assert "storage synchronized" not in rig.log("source.log")
    assert hmp(rig.src, f'qemu-io {DRIVE} "resume early"') == ""

    src_rc, dst_rc = rig.finish(source), rig.finish(dest)
    log = rig.log("source.log")
    assert (src_rc, dst_rc) == (0, 0), f"{log}\ndest:\n{rig.log('dest.log')}"
    order = [log.index(text) for text in ("migrating RAM", HELD, "storage synchronized")]
    assert order == sorted(order), log
    assert "-early-ram: RAM copied while the disk is mirrored" in log
    assert rig.status(rig.dst) == "running" and rig.status(rig.src) == "postmigrate"
    rig.src.stop()
    rig.dst.stop()
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", rig.src_disk, rig.dst_disk],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_sigint_while_held_for_the_mirror_cancels_both_and_the_vm_runs(
    rig_factory, qemu_backports, tmp_path
):
    """A signal while RAM waits at the gate for the mirror: the migration and the job
    are cancelled (the stuck read is resumed once the signal is in), the VM runs on the
    source, no bitmap, node or setting is left, the destination gives up."""
    rig, before, dest, source = held_mirror(rig_factory, qemu_backports, tmp_path)
    source.send_signal(signal.SIGINT)
    assert hmp(rig.src, f'qemu-io {DRIVE} "resume early"') == ""
    assert rig.finish(source, 60) == 130, rig.log("source.log")
    one_error(rig, "source.log", "interrupted by SIGINT during the disk mirror and RAM copy")
    assert "point of no return" not in rig.log("source.log")
    assert status(rig.src) == "running"
    assert_source_clean(rig, before)
    assert rig.finish(dest, 60) == 1, rig.log("dest.log")


def test_early_ram_on_qemu_7_2_under_tcg_synchronizes_the_disk_first(rig_factory):
    """The host's 7.2 under TCG has no gate (see migration.tcg_dirty_tracking_flaw): the
    flag is said to be without effect, and the disk is READY before `migrate`."""
    rig = rig_factory()
    rig.up()
    dest = rig.start_dest()
    source = rig.start_source("10.0.0.2", "-early-ram")
    src_rc, dst_rc = rig.finish(source), rig.finish(dest)
    log = rig.log("source.log")
    assert (src_rc, dst_rc) == (0, 0), f"{log}\ndest:\n{rig.log('dest.log')}"
    assert "-early-ram: no switchover gate (TCG before QEMU 9.0)" in log
    assert log.index("storage synchronized") < log.index("migrating RAM"), log
