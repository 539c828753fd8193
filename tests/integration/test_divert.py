"""katamaran.divert against a real QEMU in a Kata-shaped pod: the tap's feed taken and given back.

Why: at the switchover a frame the node had already routed to the pod can reach the tap
after traffic was switched; if QEMU pauses the VM then, it parks that frame and it dies
with the source.  While diverted, nothing reaches the tap: every frame comes to
katamaran (in node A's namespace, where it runs), and once the divert is removed the VM
answers again, with Kata's own filter untouched and nothing of the divert left.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
from ipaddress import ip_address

import pytest

from katamaran.config import Config
from katamaran.divert import DIVERT_PRIO, INGRESS, TapDivert, redirect_targets
from katamaran.progress import Progress
from katamaran.qmp import Monitor
from katamaran.source import SourceMigration
from katamaran.tapqueue import TapQueues
from pytest_katamaran.lab.local import VM_IP
from pytest_katamaran.net.hostlab import ipr, run_in_netns
from tests.integration.test_tapqueue import _echo_requests

pytestmark = pytest.mark.qemu


def _filters(netns: str, ifname: str) -> list[tuple[int, tuple[int, ...]]]:
    """(prio, mirred targets) of each ingress filter on `ifname` that redirects."""
    with ipr(netns) as ip:
        index = ip.link_lookup(ifname=ifname)[0]
        found = ip.get_filters(index=index, parent=INGRESS)
        return sorted({(m["info"] >> 16, tuple(t)) for m in found if (t := redirect_targets(m))})


def _links(netns: str) -> set[str]:
    with ipr(netns) as ip:
        return {link.get_attr("IFLA_IFNAME") for link in ip.get_links()}


def test_the_tap_gets_nothing_while_diverted_and_its_feed_back_after(rig_factory):
    rig = rig_factory(kata_pod=True)
    rig.up()
    pid, pod, node = rig.src.pid, rig.pod.netns, rig.lab.a.netns
    assert pid is not None and rig.pod is not None
    kata = _filters(pod, "eth0")
    assert len(kata) == 1 and kata[0][0] != DIVERT_PRIO, f"not Kata's tcfilter: {kata}"
    warm = rig.lab.run("a", ["ping", "-c", "1", "-W", "5", VM_IP], capture_output=True)
    assert warm.returncode == 0, "the VM does not answer ping"

    got: list[bytes] = []

    def forward(packets: list[bytes]) -> int:  # what the tunnel's rule would carry
        got.extend(packets)
        return len(packets)

    divert = TapDivert(pid, "tap0_kata", ip_address(VM_IP))
    queues = TapQueues.of(pid)
    try:
        run_in_netns(node, lambda: divert.prepare(forward))  # katamaran runs in node A
        mine, peer = divert.mine, divert.peer
        assert mine in _links(node) and peer in _links(pod)
        run_in_netns(node, divert.divert)
        ours = [f for f in _filters(pod, "eth0") if f[0] == DIVERT_PRIO]
        assert len(ours) == 1, f"no divert filter ahead of Kata's: {_filters(pod, 'eth0')}"

        ping = ["ping", "-c", "5", "-i", "0.05", "-W", "1", VM_IP]
        lost = rig.lab.run("a", ping, capture_output=True, text=True)
        assert lost.returncode != 0, f"the VM answered while its feed was diverted: {lost.stdout}"
        assert queues.queued() == [], "a frame reached the tap while diverted"

        run_in_netns(node, divert.remove)
        # the veth's counters and the socket's agreed: nothing was left on its way
        assert divert.settled is True
    finally:
        queues.close()
        if divert.installed or divert.sources:
            run_in_netns(node, divert.remove)
        divert.close()
    assert sorted(_echo_requests(got)) == [1, 2, 3, 4, 5], "katamaran did not get every ping"
    assert divert.stats.forwarded == len(got) and divert.error is None
    assert _filters(pod, "eth0") == kata, "Kata's filter was changed"
    assert mine not in _links(node) and peer not in _links(pod), "the divert veth was left"
    again = rig.lab.run("a", ["ping", "-c", "2", "-W", "5", VM_IP], stdout=subprocess.DEVNULL)
    assert again.returncode == 0, "the VM did not get its feed back"


def test_a_killed_runs_divert_is_found_and_removed(rig_factory):
    """A run killed while diverting leaves the filter and veth: the VM gets nothing until
    the next run for this VM removes them, first thing (SourceMigration._check_state),
    before it resumes the VM."""
    rig = rig_factory(kata_pod=True)
    rig.up()
    pid, pod, node = rig.src.pid, rig.pod.netns, rig.lab.a.netns
    assert pid is not None and rig.pod is not None
    kata = _filters(pod, "eth0")
    dead = TapDivert(pid, "tap0_kata", ip_address(VM_IP))
    run_in_netns(node, lambda: dead.prepare(lambda packets: len(packets)))
    run_in_netns(node, dead.divert)
    dead._stop.set()  # the process "dies": its thread and sockets go, the kernel state stays
    assert dead._sock is not None
    dead._sock.close()
    dead.close()
    blocked = rig.lab.run("a", ["ping", "-c", "2", "-W", "1", VM_IP], stdout=subprocess.DEVNULL)
    assert blocked.returncode != 0, "the killed run's divert did not hold the VM's traffic"

    async def rerun() -> list[str]:  # what the next run for this VM does first
        mon = Monitor(rig.src.qmp_path, 30.0)
        await mon.connect()
        try:
            cfg = Config(mode="source", vm_ip=ip_address(VM_IP), dest_ip=ip_address("10.0.0.2"))
            return await SourceMigration(cfg, mon, Progress(io.StringIO()))._remove_stale_diverts()
        finally:
            await mon.close()

    removed = run_in_netns(node, lambda: asyncio.run(rerun()))
    assert any("filter" in r for r in removed) and any("veth" in r for r in removed), removed
    assert _filters(pod, "eth0") == kata
    assert dead.mine not in _links(node) and dead.peer not in _links(pod)
    ok = rig.lab.run("a", ["ping", "-c", "2", "-W", "5", VM_IP], stdout=subprocess.DEVNULL)
    assert ok.returncode == 0, "the VM did not get its feed back"
