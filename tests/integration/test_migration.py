"""Real migrations: two TCG QEMUs in two netns nodes, `katamaran` as two processes."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from pytest_katamaran.checks.disk import last_ack
from pytest_katamaran.lab.local import VM_IP, GuestPanicked, qmp, wait_for_text

pytestmark = pytest.mark.qemu


def assert_migrated(rig, src_rc: int, dst_rc: int) -> None:
    logs = f"\nsource:\n{rig.log('source.log')}\ndest:\n{rig.log('dest.log')}"
    assert src_rc == 0, f"katamaran source exited {src_rc}{logs}"
    assert dst_rc == 0, f"katamaran dest exited {dst_rc}{logs}"
    assert dest_status(rig) == "running"
    assert rig.status(rig.src) == "postmigrate"
    assert "migration completed in" in rig.log("source.log")


def dest_status(rig) -> str:
    try:
        return rig.status(rig.dst)
    except GuestPanicked as panic:
        # A TCG guest-kernel crash after a completed migration, reproduced with bare QMP
        # too (see GuestPanicked): reported as an expected failure, with the panic line.
        pytest.xfail(f"destination guest kernel panicked after migration: {panic}")


def migration_settings(box) -> tuple[dict, dict]:
    caps = {c["capability"]: c["state"] for c in qmp(box.qmp_path, "query-migrate-capabilities")}
    params = qmp(box.qmp_path, "query-migrate-parameters")
    return caps, {k: params.get(k) for k in ("downtime-limit", "max-bandwidth", "tls-creds")}


def assert_nothing_left(rig, dest: bool = True) -> None:
    """No block job, NBD export or helper node left (dest: once its katamaran has exited)."""
    assert qmp(rig.src.qmp_path, "query-block-jobs") == []
    nodes = qmp(rig.src.qmp_path, "query-named-block-nodes", flat=True)
    assert not [n for n in nodes if n.get("node-name", "").startswith("katamaran")]
    if dest and rig.dst.alive():
        assert qmp(rig.dst.qmp_path, "query-block-exports") == []
        nodes = qmp(rig.dst.qmp_path, "query-named-block-nodes", flat=True)
        assert not [n for n in nodes if n.get("node-name", "").startswith("katamaran")]


@pytest.mark.parametrize("dest_ip", ["10.0.0.2", "fd00:10::2"], ids=["ipv4", "ipv6"])
def test_nbd_migration_carries_the_disk(rig_factory, dest_ip):
    rig = rig_factory()
    rig.up()
    before = [migration_settings(box) for box in (rig.src, rig.dst)]
    dest = rig.start_dest()
    source = rig.start_source(dest_ip)
    assert_migrated(rig, rig.finish(source), rig.finish(dest))
    assert "downtime" in rig.log("source.log") and "storage" in rig.log("source.log")
    # the rig's VM runs under TCG: before QEMU 9.0 its migration can lose guest stores,
    # and the operator is told (system QEMU here: Debian 12's 7.2)
    version = qmp(rig.src.qmp_path, "query-version")["qemu"]
    warned = "WARNING: the VM runs under TCG on QEMU" in rig.log("source.log")
    assert warned == ((version["major"], version["minor"]) < (9, 0)), rig.log("source.log")
    assert_nothing_left(rig)
    # both sides put back every capability and parameter they changed
    assert [migration_settings(box) for box in (rig.src, rig.dst)] == before
    rig.src.stop()
    rig.dst.stop()
    compare = subprocess.run(
        ["qemu-img", "compare", rig.src_disk, rig.dst_disk], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_incoming_tcp_destination(rig_factory):
    """A destination QEMU already listening (-incoming tcp:...) works too."""
    rig = rig_factory()
    rig.up(incoming="tcp:[::]:4444")
    dest = rig.start_dest()
    assert "already listening" in rig.log("dest.log")
    source = rig.start_source()
    assert_migrated(rig, rig.finish(source), rig.finish(dest))


@pytest.mark.parametrize("shared", [False, True], ids=["nbd", "shared-storage"])
def test_writing_guest_loses_no_write(rig_factory, qemu_backports, shared):
    """Every write the guest completed, before or after the switch, is on the final disk.

    On backports' QEMU (10.0), as the e2e pods: the host's 7.2 loses TCG guest stores
    during migration (katamaran warns, see migration.tcg_dirty_tracking_flaw), and its
    destination guest died under this test in CI (2026-12-02)."""
    rig = rig_factory(writer=True, shared=shared, qemu=qemu_backports)
    rig.up()
    wait_for_text(rig.src.console_log, "ACK ", 60)
    dest = rig.start_dest()
    source = rig.start_source()
    assert_migrated(rig, rig.finish(source), rig.finish(dest))
    assert "WARNING: the VM runs under TCG" not in rig.log("source.log")
    if not shared:  # -copy-mode auto: QEMU 8.2+ switches the READY mirror
        assert "mirror switched to write-blocking" in rig.log("source.log")
    # The writer goes on at the destination; a dead destination guest is reported as
    # such (dest_status), not as "no writes".
    rig.check_writes_survived(poll=lambda: dest_status(rig))


def test_sigint_mid_migration_leaves_source_running_and_clean(rig_factory):
    # 768 MiB of data to mirror keeps the migration in flight long enough to interrupt.
    rig = rig_factory(writer=True, disk_mib=1024, fill_mib=768)
    rig.up()
    dest = rig.start_dest()
    source = rig.start_source()
    wait_for_text(rig.tmp / "source.log", "mirroring", 60, source)
    source.send_signal(signal.SIGINT)
    rc = rig.finish(source)
    assert rc == 130, rig.log("source.log")
    assert "aborting and cleaning up" in rig.log("source.log")
    assert rig.status(rig.src) == "running"
    assert_nothing_left(rig, dest=False)
    before = last_ack(rig.src.console_log)
    deadline = time.monotonic() + 30
    while last_ack(rig.src.console_log) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last_ack(rig.src.console_log) > before, "source guest stopped writing after abort"
    dest.send_signal(signal.SIGTERM)
    assert rig.finish(dest) == 130, rig.log("dest.log")
    assert qmp(rig.dst.qmp_path, "query-block-exports") == []

    # Idempotent: a second run after the abort migrates cleanly.
    (rig.tmp / "dest.log").rename(rig.tmp / "dest-1.log")
    (rig.tmp / "source.log").rename(rig.tmp / "source-1.log")
    dest = rig.start_dest()
    source = rig.start_source()
    assert_migrated(rig, rig.finish(source), rig.finish(dest))


def test_source_fails_cleanly_when_destination_is_absent(rig_factory):
    rig = rig_factory()
    rig.up()
    source = rig.start_source()
    rc = rig.finish(source)
    assert rc == 1
    log = rig.log("source.log")
    assert "drive-mirror failed" in log and "10.0.0.2:10809" in log, log
    assert "Traceback" not in log
    assert rig.status(rig.src) == "running"
    assert_nothing_left(rig)


def test_kata_shaped_pod_migrates_and_answers_on_destination(rig_factory):
    """Source QEMU in a pod netns whose eth0 ingress Kata redirects into tap0_kata.

    katamaran opens the migration and NBD streams in the node's namespace and passes
    them to QEMU, so the redirect cannot swallow their replies. After the migration the
    VM answers pings on node B through the destination's tap0_kata.
    """
    rig = rig_factory(kata_pod=True)
    rig.up()
    before = rig.lab.run("a", ["ping", "-c", "3", "-W", "5", VM_IP], capture_output=True, text=True)
    assert before.returncode == 0, f"VM unreachable through the Kata tcfilter: {before.stdout}"
    dest = rig.start_dest()
    source = rig.start_source()
    assert_migrated(rig, rig.finish(source), rig.finish(dest))
    rig.dest_tap.add_pod_route()  # the CNI converges on node B
    after = rig.lab.run("b", ["ping", "-c", "3", "-W", "5", VM_IP], capture_output=True, text=True)
    assert after.returncode == 0, f"migrated VM does not answer on node B: {after.stdout}"


def test_source_qemu_dying_mid_migration_is_reported_and_cleaned_up(rig_factory):
    rig = rig_factory(disk_mib=1024, fill_mib=768)
    rig.up()
    dest = rig.start_dest()
    source = rig.start_source()
    wait_for_text(rig.tmp / "source.log", "mirroring", 60, source)
    rig.src.stop(grace=0)  # QEMU dies under katamaran
    assert rig.finish(source) == 1, rig.log("source.log")
    log = rig.log("source.log")
    assert "connection is closed" in log, log
    assert "Traceback" not in log
    dest.send_signal(signal.SIGTERM)
    assert rig.finish(dest) == 130, rig.log("dest.log")
    assert qmp(rig.dst.qmp_path, "query-block-exports") == []


def test_dest_leaves_the_taps_neighbours_alone_and_says_what_it_cannot_scope(rig_factory):
    """The hold addresses held packets to the VM on a veth of its own, so nothing is pinned
    on the tap; without -source-ip the destination says what it cannot scope."""
    rig = rig_factory()
    rig.up()

    def neighbours() -> str:
        show = ["ip", "neigh", "show", "dev", "tap0_kata"]
        return rig.lab.run("b", show, capture_output=True, text=True, check=True).stdout

    before = [ln for ln in neighbours().splitlines() if "PERMANENT" in ln]
    dest = rig.start_dest("-vm-ip", VM_IP)
    source = rig.start_source()
    assert_migrated(rig, rig.finish(source), rig.finish(dest))
    assert [ln for ln in neighbours().splitlines() if "PERMANENT" in ln] == before
    log = rig.log("dest.log")
    assert "-source-ip not given: packets tunnelled from ANY host" in log, log
