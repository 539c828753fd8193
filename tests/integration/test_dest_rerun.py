"""A destination katamaran SIGKILLed after changing sysctls: the re-run puts them back.

The destination changes node sysctls for the hold (forwarding on the tunnel device;
`net.ipv6.conf.all.forwarding` for an IPv6 VM, which has no per-device switch).  A
SIGKILLed run cannot put them back, so it writes their old values next to the VM's lock
before each change; the run after it restores them.

The killed run here is katamaran's own DestDecap and journal, in node b's netns, killed by
SIGKILL right after the changes: its tunnel setup cannot run on this host, whose kernel
has no ipip/sit (the nested lab's hold-fault cases run the whole destination).  The
re-run is the real CLI, on a destination QEMU that already runs the migrated VM.
"""

from __future__ import annotations

import signal
import sys

import pytest

from katamaran.dest import SYSCTL_JOURNAL
from katamaran.lock import VMLock
from pytest_katamaran.net.hostlab import read_sysctl, write_sysctl

pytestmark = pytest.mark.qemu

VM_IP = "fd00:5::5"
NODE_WIDE = "net.ipv6.conf.all.forwarding"

KILLED_RUN = """
import os, signal, sys
from ipaddress import ip_address
from pathlib import Path
from katamaran.dest import DestMigration
from katamaran.lock import VMLock
from katamaran.network import DestDecap

qmp, tap, vm_ip = sys.argv[1:]
lock = VMLock(Path(qmp))
lock.acquire()
decap = DestDecap(tap, "", ip_address(vm_ip), None)
decap.journal = DestMigration(None, None, None, lock)._journal_sysctls
decap._relax(tap)
decap._ipv6_forwarding([])
print("changed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_rerun_restores_the_sysctls_a_killed_destination_changed(rig_factory):
    rig = rig_factory(shared=True)
    rig.up()
    dest = rig.start_dest()
    source = rig.start_source("10.0.0.2")
    assert rig.finish(source) == 0, rig.log("source.log")
    assert rig.finish(dest) == 0, rig.log("dest.log")
    assert rig.status(rig.dst) == "running"

    device = f"net.ipv4.conf.{rig.tap}.forwarding"
    write_sysctl(rig.lab.b.netns, device, 0)
    write_sysctl(rig.lab.b.netns, NODE_WIDE, 0)
    killed = rig.lab.run(
        "b",
        [sys.executable, "-c", KILLED_RUN, str(rig.dst.qmp_path), rig.tap, VM_IP],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert killed.stdout.strip() == "changed", killed.stderr
    assert read_sysctl(rig.lab.b.netns, device) == "1"
    assert read_sysctl(rig.lab.b.netns, NODE_WIDE) == "1"

    rerun = rig.katamaran(
        "b",
        *("-mode", "dest", "-qmp", str(rig.dst.qmp_path), "-tap", rig.tap),
        *("-vm-ip", VM_IP, "-shared-storage"),
        log="rerun.log",
    )
    assert rig.finish(rerun, 60) == 1, rig.log("rerun.log")
    errors = [ln for ln in rig.log("rerun.log").splitlines() if "not waiting for" in ln]
    assert len(errors) == 1, rig.log("rerun.log")
    assert f"change of {NODE_WIDE} (back to 0)" in errors[0], errors[0]
    assert f"change of {device} (back to 0)" in errors[0], errors[0]
    assert read_sysctl(rig.lab.b.netns, device) == "0"
    assert read_sysctl(rig.lab.b.netns, NODE_WIDE) == "0"
    with VMLock(rig.dst.qmp_path) as lock:  # the journal is gone with what it recorded
        assert lock.load_state(SYSCTL_JOURNAL) is None
