"""Real namespaces, taps and TCG QEMU: the sandbox, the two-node host lab and pod networks.

Tests marked `qemu` boot the katamaran test guest (pytest_katamaran.images.guest) under TCG.
The rest only need root for network namespaces.  Everything is torn down in
`finally`/fixtures, and tests assert that teardown really removed what was created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from pytest_katamaran.net.hostlab import HostLab, read_sysctl
from pytest_katamaran.net.pod import (
    CALICO_MAC,
    GATEWAY_IP,
    PodNet,
    TcFilterUnavailable,
    prepare_dest_tap,
)
from pytest_katamaran.qemu.sandbox import Sandbox, SandboxSockets, discover_qmp_sockets
from pytest_katamaran.qemu.workload import SandboxSpec

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

TAP_NET = "192.168.77"  # node A's tap and the guest, one /24
POD_IP = "10.244.1.5"
BOOT_TIMEOUT = 120  # TCG on a loaded 2-core machine


# -- helpers ---------------------------------------------------------------------------


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def link_names(netns: str) -> set[str]:
    """Interface names in a netns (states are left out: carrier may still be settling)."""
    return {
        line.split()[0].split("@")[0] for line in ip_out("-n", netns, "-br", "link").splitlines()
    }


def netns_names() -> set[str]:
    return {line.split()[0] for line in ip_out("netns", "list").splitlines() if line.strip()}


def ping(netns: str, target: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-c", str(count), "-i", "0.2", "-W", "3", target],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_ping_ok(netns: str, target: str, count: int = 3) -> None:
    r = ping(netns, target, count)
    assert r.returncode == 0 and f"{count} received" in r.stdout, r.stdout + r.stderr


def qmp_query_status(path: Path) -> dict:
    """Minimal QMP client: greeting, qmp_capabilities, query-status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        assert "QMP" in greeting
        for cmd in ("qmp_capabilities", "query-status"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while "return" not in (reply := json.loads(f.readline())) and "error" not in reply:
                pass  # skip asynchronous events
            assert "return" in reply, reply
        return reply["return"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def netns_inode(name: str) -> int:
    return os.stat(f"/var/run/netns/{name}").st_ino


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest():
    from pytest_katamaran.images.guest import build_guest

    return build_guest()


@pytest.fixture
def run_dir():
    """A short run dir (unix socket paths are limited to 107 bytes; tmp_path can be long)."""
    d = Path(tempfile.mkdtemp(prefix="kmr-run-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def lab():
    lab = HostLab()
    try:
        yield lab.up()
    finally:
        lab.teardown()


def add_tap(netns: str, name: str, address: str | None = None, prefixlen: int = 24) -> None:
    with IPRoute(netns=netns, flags=0) as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=name)[0]
        if address:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")


# -- host lab --------------------------------------------------------------------------


def test_hostlab_nodes_link_forwarding_and_teardown():
    lab = HostLab()
    other = HostLab()
    assert {lab.a.netns, lab.b.netns}.isdisjoint({other.a.netns, other.b.netns})
    try:
        lab.up()
        assert {lab.a.netns, lab.b.netns} <= netns_names()
        for node in lab.nodes:
            assert read_sysctl(node.netns, "net.ipv4.ip_forward") == "1"
            addrs = ip_out("-n", node.netns, "-br", "addr", "show", node.ifname)
            assert f"{node.ipv4}/24" in addrs and f"{node.ipv6}/64" in addrs
            assert "UP" in ip_out("-n", node.netns, "-br", "link", "show", "lo")
        assert_ping_ok(lab.a.netns, lab.b.ipv4)
        assert_ping_ok(lab.b.netns, lab.a.ipv6)
        r = lab.run("b", ["cat", "/proc/sys/net/ipv4/ip_forward"], capture_output=True, text=True)
        assert r.stdout.strip() == "1"
        p = lab.popen(lab.a, ["sleep", "30"])
        try:
            assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
            assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == netns_inode(lab.a.netns)
        finally:
            p.kill()
            p.wait()
    finally:
        lab.teardown()
    lab.teardown()  # idempotent
    # only ours are checked: other tests (xdist workers) may add/remove namespaces meanwhile
    assert {lab.a.netns, lab.b.netns}.isdisjoint(netns_names())


# -- QMP socket discovery ---------------------------------------------------------------


def test_discover_qmp_sockets_prefers_extra_monitor(tmp_path):
    listeners = []

    def bind(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        listeners.append(s)

    try:
        bind(tmp_path / "both" / "qmp.sock")
        bind(tmp_path / "both" / "extra-monitor.sock")
        (tmp_path / "both" / "pid").write_text("4242\n")
        bind(tmp_path / "plain" / "qmp.sock")
        (tmp_path / "empty").mkdir()
        (tmp_path / "notadir").write_text("")
        (tmp_path / "fake" / "qmp.sock").parent.mkdir()
        (tmp_path / "fake" / "qmp.sock").write_text("regular file, not a socket")
        found = discover_qmp_sockets(tmp_path)
    finally:
        for s in listeners:
            s.close()
    assert [s.id for s in found] == ["both", "plain"]
    both, plain = found
    assert both.preferred == tmp_path / "both" / "extra-monitor.sock"
    assert both.qmp == tmp_path / "both" / "qmp.sock"
    assert both.read_pid() == 4242
    assert plain == SandboxSockets("plain", tmp_path / "plain" / "qmp.sock", None, None)
    assert plain.preferred == plain.qmp
    assert discover_qmp_sockets(tmp_path / "missing") == []


# -- pod networks ----------------------------------------------------------------------


def test_podnet_shape_and_teardown(lab):
    node = lab.a.netns
    links_before = link_names(node)
    pod = PodNet(name=f"{node}-pod", pod_ip=POD_IP, node_netns=node, tcfilter=False)
    try:
        pod.setup()
        cali = ip_out("-n", node, "addr", "show", pod.host_ifname)
        assert CALICO_MAC in cali and f"{GATEWAY_IP}/32" in cali
        assert pod.host_ifname.startswith("cali") and len(pod.host_ifname) == 15
        assert read_sysctl(node, f"net/ipv4/conf/{pod.host_ifname}/proxy_arp") == "1"
        assert read_sysctl(node, f"net/ipv4/conf/{pod.host_ifname}/rp_filter") == "1"
        assert f"{POD_IP} dev {pod.host_ifname}" in ip_out("-n", node, "route")
        eth0 = ip_out("-n", pod.netns, "addr", "show", "eth0")
        assert f"{POD_IP}/32" in eth0 and pod.mac is not None and pod.mac in eth0
        assert f"default via {GATEWAY_IP} dev eth0" in ip_out("-n", pod.netns, "route")
        assert "onlink" in ip_out("-n", pod.netns, "route")
        assert "tap0_kata" in ip_out("-n", pod.netns, "-br", "link")
        assert ip_out("-n", pod.netns, "-d", "link", "show", "tap0_kata").count("tun type tap")
        assert pod.guest_ip == f"{POD_IP}/32" and pod.gateway == GATEWAY_IP
    finally:
        pod.teardown()
    pod.teardown()  # idempotent
    assert pod.netns not in netns_names()
    assert link_names(node) == links_before
    assert POD_IP not in ip_out("-n", node, "route")


def test_podnet_tcfilter_unavailable_error(lab):
    """Where the kernel lacks ingress/u32/mirred, asking for tcfilter fails in one clear line."""
    node = lab.a.netns
    links_before = link_names(node)
    pod = PodNet(name=f"{node}-tcf", pod_ip=POD_IP, node_netns=node, tcfilter=True)
    try:
        pod.setup()
    except TcFilterUnavailable as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith("tcfilter unavailable on this kernel: ")
        # setup cleaned up after itself
        assert pod.netns not in netns_names()
        assert link_names(node) == links_before
        return
    try:
        filters = subprocess.run(
            ["ip", "netns", "exec", pod.netns, "tc", "filter", "show", "dev", "eth0", "ingress"],
            capture_output=True,
            text=True,
        ).stdout
        assert "Egress Redirect to device tap0_kata" in filters
    finally:
        pod.teardown()
    pytest.skip(
        f"kernel {os.uname().release} supports Kata's tcfilter (ingress qdisc + u32 + "
        "mirred): PodNet(tcfilter=True) was built, so there is no 'unavailable' error to check"
    )


def test_prepare_dest_tap(lab):
    node = lab.b.netns
    links_before = link_names(node)
    dest = prepare_dest_tap(node, pod_ip=POD_IP)
    try:
        tap = ip_out("-n", node, "-d", "addr", "show", "tap0_kata")
        assert "tun type tap" in tap and CALICO_MAC in tap and f"{GATEWAY_IP}/32" in tap
        assert "UP" in tap.splitlines()[0]
        assert read_sysctl(node, "net/ipv4/conf/tap0_kata/proxy_arp") == "1"
        assert POD_IP not in ip_out("-n", node, "route")
        dest.add_pod_route()
        assert f"{POD_IP} dev tap0_kata" in ip_out("-n", node, "route")
    finally:
        dest.teardown()
    dest.teardown()
    assert link_names(node) == links_before
    assert POD_IP not in ip_out("-n", node, "route")


# -- real QEMU -------------------------------------------------------------------------


@pytest.mark.qemu
def test_sandbox_in_node_netns_boots_and_answers_ping(guest, run_dir, record_property):
    from pytest_katamaran.images.guest import kernel_cmdline

    lab = HostLab()
    sb = Sandbox()
    try:
        lab.up()
        node = lab.a.netns
        add_tap(node, "tap0_kata", f"{TAP_NET}.1")
        disk = run_dir / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(16 << 20)
        spec = SandboxSpec(
            sandbox_id="kmrtest1",
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=kernel_cmdline(ip=f"{TAP_NET}.2/24"),
            run_dir=run_dir,
            disk=disk,
            disk_format="raw",
            mac="02:4b:4d:52:00:02",
            extra_monitor=True,
        )
        sb.start(spec, netns=node, timeout=30)
        pid = sb.pid
        assert pid is not None and pid_alive(pid)
        # QEMU itself (not a wrapper) runs in node A's netns, and wrote the Kata pidfile
        assert open(f"/proc/{pid}/cmdline").read().split("\0")[0].endswith("qemu-system-x86_64")
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode(node)

        found = discover_qmp_sockets(run_dir)
        assert [s.id for s in found] == ["kmrtest1"]
        assert found[0].qmp == spec.qmp_path
        assert found[0].extra_monitor == spec.extra_monitor_path == sb.qmp_path
        assert found[0].preferred == sb.qmp_path
        status = qmp_query_status(found[0].preferred)
        assert status["status"] in ("running", "prelaunch")

        boot = sb.wait_ready(BOOT_TIMEOUT)
        record_property("boot_time_s", round(boot, 2))
        print(f"\nboot to READY under TCG in netns {node}: {boot:.2f}s")
        assert sb.boot_time == boot
        assert found[0].read_pid() == pid
        assert qmp_query_status(sb.qmp_path)["status"] == "running"
        assert "KATAMARAN-GUEST-READY" in sb.console_log.read_text(errors="replace")

        assert_ping_ok(node, f"{TAP_NET}.2")
        sb.stop()
        assert not pid_alive(pid)
        assert not spec.sandbox_dir.exists()
        assert discover_qmp_sockets(run_dir) == []
        sb.stop()  # idempotent
    finally:
        sb.stop()
        lab.teardown()
    assert {lab.a.netns, lab.b.netns}.isdisjoint(netns_names())


@pytest.mark.qemu
def test_sandbox_failures_carry_argv_and_serial_log(guest, run_dir):
    from pytest_katamaran.images.guest import kernel_cmdline

    spec = SandboxSpec(
        sandbox_id="kmrfail",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=kernel_cmdline(),
        run_dir=run_dir,
        tap=None,
    )
    with Sandbox() as sb:
        sb.start(spec)
        with pytest.raises(TimeoutError) as exc:
            sb.wait_ready(timeout=0.2)
        assert "QEMU argv" in str(exc.value) and "sandbox-kmrfail" in str(exc.value)
        assert "serial log tail" in str(exc.value)
        pid = sb.pid
    assert pid is not None and not pid_alive(pid)
    assert not spec.sandbox_dir.exists()

    bad = SandboxSpec(
        sandbox_id="kmrbad", kernel=run_dir / "nope", initrd=guest.initrd, run_dir=run_dir
    )
    sb = Sandbox()
    try:
        with pytest.raises(RuntimeError, match="QEMU exited") as exc:
            # QEMU may create its QMP socket before it fails to load the kernel
            sb.start(bad, timeout=30)
            sb.wait_ready(timeout=30)
        assert "nope" in str(exc.value)  # QEMU's stderr is in the message
    finally:
        sb.stop()
    assert not bad.sandbox_dir.exists()


@pytest.mark.qemu
def test_vm_in_kata_shaped_pod_is_reachable_through_tcfilter(guest, lab, run_dir):
    """The full Calico + Kata tcfilter shape: node A and node B ping the VM's pod IP."""
    from pytest_katamaran.images.guest import kernel_cmdline

    node = lab.a.netns
    pod = PodNet(name=f"{node}-pod", pod_ip=POD_IP, node_netns=node, tcfilter=True)
    try:
        try:
            pod.setup()
        except TcFilterUnavailable as exc:
            pytest.skip(str(exc))
        spec = SandboxSpec(
            sandbox_id="kmrpod",
            kernel=guest.kernel,
            initrd=guest.initrd,
            append=kernel_cmdline(ip=pod.guest_ip, gw=pod.gateway),
            run_dir=run_dir,
            mac=pod.mac or "",
        )
        with Sandbox() as sb:
            sb.start(spec, netns=pod.netns)
            sb.wait_ready(BOOT_TIMEOUT)
            console = sb.console_log.read_text(errors="replace")
            if "Network is unreachable" in console or "default route via" in console:
                pytest.xfail(
                    "guest init could not add `default via 169.254.1.1` for a /32 address: "
                    "it needs an onlink gateway route (ip route add GW dev eth0 first)"
                )
            assert_ping_ok(node, POD_IP)
            lab.run("b", ["ip", "route", "add", "10.244.0.0/16", "via", lab.a.ipv4], check=True)
            assert_ping_ok(lab.b.netns, POD_IP)
    finally:
        pod.teardown()
    assert pod.netns not in netns_names()
