"""Fixtures of the two-node e2e suite: node-side helpers, shared storage, the pod ping.

Every fixture that starts something stops it in its finalizer (workload VMs, nets and
routes on both nodes via `nodeside stop --purge`, the host's NBD server, ping), so a
failing or interrupted test leaves the session's nodes clean for the next one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from e2e_lab import NodeSide, WorkloadQemu, backports_qemu, qemu_version

from pytest_katamaran.node_vm import free_port
from pytest_katamaran.ping import PingMonitor

# Inside a node, the host's loopback is reachable at user-mode NAT's host alias.
HOST_FROM_NODE = "10.0.2.2"
SHARED_EXPORT = "shared"
SHARED_DISK_SIZE = "64M"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's outcome on the item (finalizers look at `rep_call`)."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="session")
def guest_image():
    """The workload guest (cloud kernel + busybox initramfs), built on the host, seen by nodes."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    from pytest_katamaran.guest import build_guest

    return build_guest()


@pytest.fixture(scope="session")
def workload_qemu() -> WorkloadQemu:
    """The workload VMs' QEMU: Debian backports' by default (KATAMARAN_E2E_QEMU=system: 7.2).

    QEMU 7.2 corrupts a TCG guest's RAM during live migration (see
    `e2e_lab.backports_qemu`); with it the migrated workload panics on node B in most
    runs, whatever katamaran does.
    """
    from pytest_katamaran.guest import cache_root

    choice = os.environ.get("KATAMARAN_E2E_QEMU", "backports")
    if choice == "backports":
        try:
            return backports_qemu(cache_root())
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            warnings.warn(
                pytest.PytestWarning(
                    f"backports QEMU unavailable ({exc}); the workload runs on the system QEMU, "
                    "whose TCG migration can corrupt the guest"
                ),
                stacklevel=1,
            )
    binary = "qemu-system-x86_64"
    return WorkloadQemu(binary, "", qemu_version(binary))


@pytest.fixture
def sides(request, node_a, node_b, katamaran_config):
    """NodeSide for A and B; their finalizer stops everything the test started there."""
    a, b = NodeSide(node_a), NodeSide(node_b)
    yield a, b
    rep = getattr(request.node, "rep_call", None)
    if katamaran_config.keep_on_failure and rep is not None and rep.failed:
        return  # --keep-nodes-on-failure: leave the workload for inspection too
    problems = []
    for side in (a, b):
        try:
            side.call("stop", "--purge", timeout=180)
        except Exception as exc:  # report, but go on stopping the other node
            problems.append(f"{side.name}: {exc}")
    if problems:
        warnings.warn(
            pytest.PytestWarning("e2e cleanup failed: " + "; ".join(problems)), stacklevel=1
        )


@pytest.fixture
def shared_disk(tmp_path):
    """Shared storage: one qcow2 on this host, exported over NBD to both nodes.

    Why this shape: the node VMs see the host root read-only, and QEMU in the source's
    pod netns cannot open network connections of its own (Kata's tcfilter redirects all
    ingress into the VM).  So each node maps the export as a kernel block device
    (`/dev/nbd0`, like krbd/iSCSI for a real Kata node) and QEMU opens that device.
    """
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed (apt-get install qemu-utils)")
    disk = tmp_path / "shared.qcow2"
    # preallocation=metadata: the export is the file's bytes and a block device cannot
    # grow, so the qcow2 must span its full size up front (sparse here).  Without it the
    # export is ~9 MB and the guest's first write past it pauses the VM (io-error).
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
        + [disk, SHARED_DISK_SIZE],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40M 8M", disk],
        check=True,
        capture_output=True,
    )
    port = free_port()
    log = tmp_path / "qemu-nbd.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            # -f raw: export the qcow2 file's bytes; each node's QEMU opens them as qcow2.
            ["qemu-nbd", "-t", "-e", "4", "-f", "raw", "-x", SHARED_EXPORT]
            + ["-b", "127.0.0.1", "-p", str(port), str(disk)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not _listening(port) and time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"qemu-nbd exited: {log.read_text()}")
            time.sleep(0.1)
        yield {"path": disk, "host": HOST_FROM_NODE, "port": port, "export": SHARED_EXPORT}
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _listening(port: int) -> bool:
    """True once something listens on the port (read from /proc: a probe connection would
    count as an NBD client)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            return True
    return False


@pytest.fixture
def pod_ping(katamaran_config):
    """Factory: a continuous ping from a node to the pod, from the node's private IP.

    Why not the plugin's `ping`: node A's kernel would pick the cali link's 169.254.1.1
    (or the NAT NIC's 10.0.2.15, identical on both nodes) as the source address, which
    node B answers locally once the pod lives there; `-I <node IP>` is what a client
    elsewhere in the cluster would look like.
    """
    monitors: list[PingMonitor] = []

    def start(node, target: str, interval: float | None = None) -> PingMonitor:
        every = interval if interval is not None else katamaran_config.ping_interval
        mon = PingMonitor(
            node.ssh,
            target,
            every,
            name=f"ping {target} from {node.name} ({node.private_ip})",
            extra_args=("-I", node.private_ip),
        )
        monitors.append(mon)
        return mon.start(ready_timeout=60.0)

    yield start
    for mon in monitors:
        if mon.handle is not None and mon.stats is None:
            try:
                mon.stop()
            except Exception as exc:
                warnings.warn(pytest.PytestWarning(f"{mon.name}: {exc}"), stacklevel=1)
