"""E2E, TESTING.md "k3s End-to-End Migration Test": a Kata pod migrated with zero drops.

Why: the only test where katamaran moves a VM that Kata (not the harness) started, inside
a real two-node cluster.  Node A runs the k3s server and the nginx:alpine Kata pod, Node B
the agent; they talk over the private link (10.0.0.x).  The QMP socket is discovered on
Node A; Node B runs the replayed destination QEMU and ``katamaran -mode dest`` (per the
guide, destination first); then ``katamaran -mode source`` on Node A while Node A pings
the pod every 10 ms.  Every echo request must be answered.

Needs the lab nodes (``--nodes=qemu``), internet (``KATAMARAN_INTERNET=1``: get.k3s.io and
the nginx image) and Kata Containers installed in both nodes; skipped with the exact
missing piece otherwise.  Kubernetes is not told about the move (data plane only).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time

import pytest

from pytest_katamaran.checks.ping import assert_zero_drop
from pytest_katamaran.kube import model as kube
from pytest_katamaran.kube import prereq
from pytest_katamaran.kube.k3s import K3sLab, wait_output

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(5400)]

KEEP_ENV = "KATAMARAN_KEEP_CLUSTER"
DRIVE_ID = "drive-virtio-disk0"  # katamaran's default -drive-id
MIGRATION_TIMEOUT = 900.0


@pytest.fixture(scope="module")
def k3s_lab(request):
    # Internet first: no reason to boot two nodes for a flow that cannot download.
    reason = prereq.internet()
    if reason:
        pytest.skip(reason)
    node_a = request.getfixturevalue("node_a")
    node_b = request.getfixturevalue("node_b")
    lab = K3sLab(node_a, node_b, progress=lambda msg: print(f"k3s: {msg}", flush=True))
    reason = lab.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    pod = lab.setup()
    yield lab, pod
    if os.environ.get(KEEP_ENV) != "1":
        with contextlib.suppress(Exception):
            lab.teardown()


def _katamaran(mode: str, *args: str) -> str:
    return shlex.join(["python3", "-m", "katamaran", "-mode", mode, *args])


def _stop(proc) -> None:
    if proc is not None and proc.is_running():
        proc.stop(sig=signal.SIGTERM, timeout=30.0)


def test_kata_pod_migrates_with_zero_drop(k3s_lab, ping, results):
    lab, pod = k3s_lab
    node_a, node_b = lab.a, lab.b
    assert pod.node is not None and pod.pod_ip, pod.describe()

    vm = lab.source_vm(pod)  # QMP discovery on node A (extra-monitor.sock)
    results["pod"] = {"name": pod.name, "ip": pod.pod_ip, "node": pod.node}
    results["sandbox"] = vm.sandbox.id
    results["qmp"] = vm.qmp
    shared = [] if kube.uses_drive(vm.argv, DRIVE_ID) else ["-shared-storage"]
    env_a = lab.katamaran_env(node_a)
    env_b = lab.katamaran_env(node_b)

    dest = lab.prepare_destination(vm)
    dest_proc = src_proc = None
    try:
        dest_proc = node_b.ssh.start(
            _katamaran("dest", "-qmp", dest.qmp, "-tap", dest.tap, *shared), sudo=True, env=env_b
        )
        wait_output(dest_proc, "destination ready", 120, "katamaran dest on node-b")

        monitor = ping(node_a, pod.pod_ip)
        time.sleep(2.0)
        before = monitor.snapshot()
        assert before.received > 0, f"the pod does not answer ping before the migration: {before}"

        src_proc = node_a.ssh.start(
            _katamaran(
                "source", "-qmp", vm.qmp, "-dest-ip", node_b.private_ip,
                "-vm-ip", pod.pod_ip, *shared, "-tunnel-hold", "10",
            ),
            sudo=True,
            env=env_a,
        )  # fmt: skip
        wait_output(src_proc, "migration completed in", MIGRATION_TIMEOUT, "katamaran source")
        # Within the tunnel hold: the routes a CNI would converge to.
        lab.converge_routes(dest, pod.pod_ip)
        src_rc = src_proc.wait(120)
        dst_rc = dest_proc.wait(120)
        time.sleep(2.0)  # replies from the VM on node B, after the tunnel is gone
        stats = monitor.stop()

        source_log = src_proc.output() + src_proc.errors()
        dest_log = dest_proc.output() + dest_proc.errors()
        results["source_log"] = source_log
        results["dest_log"] = dest_log
        results["ping"] = stats
        logs = f"\nsource:\n{source_log[-3000:]}\ndest:\n{dest_log[-3000:]}"
        assert src_rc == 0, f"katamaran source exited {src_rc}{logs}"
        assert dst_rc == 0, f"katamaran dest exited {dst_rc}{logs}"
        status = node_b.ssh.sudo(
            shlex.join(["python3", "-c", _QMP_STATUS, dest.qmp]), env=env_b, check=False, timeout=60
        )
        assert "running" in status.stdout, f"destination VM not running: {status.stdout}{logs}"
        assert_zero_drop(stats)
    finally:
        _stop(src_proc)
        _stop(dest_proc)
        dest.cleanup()


# The destination VM's run state over its QMP socket, with katamaran's own client.
_QMP_STATUS = """
import asyncio, sys
from qemu.qmp import QMPClient
async def main():
    client = QMPClient("katamaran-e2e")
    await client.connect(sys.argv[1])
    print((await client.execute("query-status"))["status"])
    await client.disconnect()
asyncio.run(main())
"""
