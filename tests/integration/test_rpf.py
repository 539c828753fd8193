"""Why the source switches traffic only once the VM is paused (katamaran.tapqueue.Hold).

The switch is one policy rule, `to <vm-ip>` into the tunnel.  The node's reverse-path
check looks the sender up with the same rules, so from then on it finds the VM's address
"via the tunnel".  Calico's Felix sets strict rp_filter on every workload interface: a
packet the still-running VM sends after the switch is dropped on the source node.  Here
with the lab's own pod network (`PodNet`, strict rp_filter on its cali veth as Felix
sets it) in a real kernel: the pod's address sends to the node before and after
katamaran's rule; the node's own counters say what was dropped.  (The host kernel has no
ipip: the rule's table routes the address over the inter-node link, where the tunnel
would be; the reverse-path check sees the same thing.)
"""

from __future__ import annotations

import secrets
import subprocess

from katamaran.network import RULE_PRIORITY
from pytest_katamaran.net.hostlab import HostLab, ipr, read_sysctl, write_sysctl
from pytest_katamaran.net.pod import PodNet

POD_IP = "10.244.1.5"
TABLE = 4242


def _counters(lab: HostLab) -> dict[str, int]:
    """Node A's IPv4 counters: `TcpExt` (netstat) and `Icmp` (snmp), by name."""
    found: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        text = lab.run("a", ["cat", path], capture_output=True, text=True, check=True).stdout
        lines = text.splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            group, *keys = names.split()
            for key, value in zip(keys, values.split()[1:], strict=True):
                found[f"{group.rstrip(':')}{key}"] = int(value)
    return found


def _pings_from_the_pod(pod: PodNet, count: int = 2) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", pod.netns, "ping", "-c", str(count), "-W", "1", "10.0.0.1"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_strict_rp_filter_drops_what_the_vm_sends_once_its_address_is_switched():
    with HostLab() as lab:
        pod = PodNet(f"kmr-rpf-{secrets.token_hex(3)}", POD_IP, lab.a.netns, tcfilter=False)
        pod.setup()
        rule = {"family": 2, "dst": POD_IP, "dst_len": 32, "table": TABLE}
        try:
            cali = f"net/ipv4/conf/{pod.host_ifname}/rp_filter"
            assert read_sysctl(lab.a.netns, cali) == "1", "the lab pod is not Felix-strict"
            answered = _pings_from_the_pod(pod)
            assert answered.returncode == 0, f"no path from the pod: {answered.stdout}"

            with ipr(lab.a.netns) as ip:  # katamaran's switch, the tunnel's table
                link = ip.link_lookup(ifname=lab.a.ifname)[0]
                ip.route("add", dst=f"{POD_IP}/32", oif=link, table=TABLE)
                ip.rule("add", priority=RULE_PRIORITY, **rule)
            before = _counters(lab)
            _pings_from_the_pod(pod)
            after = _counters(lab)
            dropped = after["TcpExtIPReversePathFilter"] - before["TcpExtIPReversePathFilter"]
            assert dropped == 2, f"the node's reverse-path filter dropped {dropped} of 2"
            assert after["IcmpInEchos"] == before["IcmpInEchos"], "the node got the pings"

            # The same with rp_filter off: the node takes them (its answers go where the
            # rule says, so the pod gets none; what matters is what the node let in).
            write_sysctl(lab.a.netns, cali, 0)
            before = _counters(lab)
            _pings_from_the_pod(pod)
            after = _counters(lab)
            assert after["TcpExtIPReversePathFilter"] == before["TcpExtIPReversePathFilter"]
            assert after["IcmpInEchos"] - before["IcmpInEchos"] == 2
        finally:  # the rule and its table go with node A's namespace
            pod.teardown()
