"""-copy-mode auto: the READY mirror turns write-blocking where QEMU can switch it (8.2+).

The host's QEMU is 7.2 (no block-job-change): the switch is proven on Debian backports'
QEMU, unpacked into the harness cache as the two-node e2e's workload does.
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from katamaran import migration
from katamaran.qmp import Monitor
from pytest_katamaran.lab.local import qmp, wait_for_path, wait_for_text
from pytest_katamaran.qemu.binary import SYSTEM_QEMU

pytestmark = pytest.mark.qemu


def ask(binary: str, tmp_path, *commands: str) -> list:
    """Answers of a bare `-M none` QEMU (no guest) to `commands`, in order."""
    sock = tmp_path / f"qmp-{len(list(tmp_path.iterdir()))}.sock"
    proc = subprocess.Popen(
        [binary, "-M", "none", "-nodefaults", "-display", "none", "-S"]
        + ["-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_path(sock, 30, proc)

        async def run() -> list:
            mon = Monitor(sock, 30)
            await mon.connect()
            try:
                return [await mon.execute(c) for c in commands]
            finally:
                await mon.close()

        return asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


def test_query_commands_decides_the_switch(qemu_backports, tmp_path):
    """The decision follows the QEMU actually asked: 7.2 cannot switch, 10.0 can."""
    for binary in (SYSTEM_QEMU, qemu_backports.binary):
        version, commands = ask(binary, tmp_path, "query-version", "query-commands")
        at_least_8_2 = (version["qemu"]["major"], version["qemu"]["minor"]) >= (8, 2)
        assert migration.can_switch_copy_mode(commands) is at_least_8_2, version


def test_auto_copy_mode_goes_write_blocking_and_loses_no_write(rig_factory, qemu_backports):
    """A disk-writing guest on QEMU 10: the mirror is switched once READY, every write the
    guest had acknowledged is on the destination disk, and the job was actively synced."""
    rig = rig_factory(writer=True, qemu=qemu_backports, extra_monitor=True)
    rig.up()
    wait_for_text(rig.src.console_log, "ACK ", 60)
    dest = rig.start_dest()
    source = rig.start_source()
    wait_for_text(rig.tmp / "source.log", "mirror switched to write-blocking", 120, source)
    # The job outlives the RAM copy of a writing guest; QEMU says whether every dirty
    # block has been copied since the switch (then each write goes to both disks).
    jobs = qmp(rig.src.spec.qmp_path, "query-block-jobs")
    assert source.poll() is None, rig.log("source.log")
    assert [j.get("actively-synced") for j in jobs] in ([True], [False]), jobs
    src_rc, dst_rc = rig.finish(source), rig.finish(dest)
    logs = f"\nsource:\n{rig.log('source.log')}\ndest:\n{rig.log('dest.log')}"
    assert (src_rc, dst_rc) == (0, 0), logs
    assert rig.status(rig.dst) == "running"
    rig.check_writes_survived()
