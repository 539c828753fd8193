"""The drop counters each migration reads (pytest_katamaran.checks.drops), in a real kernel:
a packet dropped on a link is counted on that link, in the netns it happened in."""

from __future__ import annotations

import secrets
import subprocess

from pytest_katamaran.checks.drops import (
    DROPS_CMD,
    NODE_DROPS_CMD,
    describe_drops,
    drops_delta,
    parse_drops,
    parse_node_drops,
)


def _in(netns: str, cmd: str) -> str:
    argv = ["ip", "netns", "exec", netns, "sh", "-c", cmd]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def test_a_packet_dropped_on_a_link_is_counted_there():
    """A veth whose peer is down drops what it is given (tx_dropped), one per ping."""
    ns = f"kmr-drops-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            "ip link set lo up",
            "ip link add v0 type veth peer name v1",
            "ip link set v0 up",
            "ip addr add 10.9.9.1/24 dev v0",
            "ip neigh add 10.9.9.2 lladdr 02:00:00:00:00:02 dev v0",
        ):
            _in(ns, cmd)
        before = parse_drops(_in(ns, DROPS_CMD))
        assert before["link v0 tx_dropped"] == 0
        assert "qdisc noqueue 0: dev v0" in before
        assert any(key.startswith("softnet cpu") for key in before)
        assert "nstat IpOutNoRoutes" in before
        subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "1", "10.9.9.2"],
            capture_output=True,
            check=False,
        )
        moved = drops_delta(before, parse_drops(_in(ns, DROPS_CMD)))
        assert moved.get("link v0 tx_dropped") == 3, moved
        assert describe_drops({"node-x": moved}).startswith("drops counted on node-x: ")
        # The node-wide form names the netns: here it is one of the named ones.
        assert parse_node_drops(_in(ns, NODE_DROPS_CMD))[f"[{ns}] link v0 tx_dropped"] == 3
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_socket_and_neighbour_drops_are_summed_and_unmoved_counters_left_out():
    text = (
        "== sockets icmp\n"
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode ref pointer drops\n"
        "  1: 00000000:0001 00000000:0000 07 00000000:00000000 00:00000000 00000000"
        "     0        0 1 2 0000000000000000 7\n"
        "  2: 00000000:0002 00000000:0000 07 00000000:00000000 00:00000000 00000000"
        "     0        0 3 2 0000000000000000 5\n"
        "== softnet\n"
        "0064b855 0000000a 00000004\n"
        "== neigh arp_cache\n"
        "entries  allocs   destroys hash_grows lookups  hits     res_failed rcv_probes_mcast"
        " rcv_probes_ucast periodic_gc_runs forced_gc_runs unresolved_discards table_fulls\n"
        "00000002 00000d79 00000d06 00000001 00004394 00000934 00000004 0 0 0 0 0000000c 0\n"
        "00000002 00000f35 00000fa6 00000000 000046de 00000a1e 00000002 0 0 0 0 00000001 0\n"
    )
    got = parse_drops(text)
    assert got == {
        "sockets icmp": 12,
        "softnet cpu0": 10,
        "neigh arp_cache res_failed": 6,  # summed over the CPUs' lines, from hex
        "neigh arp_cache unresolved_discards": 13,
    }
    moved = {**got, "softnet cpu0": 11}
    assert drops_delta(got, moved) == {"softnet cpu0": 1}
    assert describe_drops({"node-a": {}}) == "drops counted on node-a: none"
