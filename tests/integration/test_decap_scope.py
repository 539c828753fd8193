"""The cutover's kernel side in a real Debian kernel: scoped decapsulation, full-size
packets, a lossless end of the hold, nothing left behind.

Why a node VM: this host's kernel has no ipip/sch_plug.  One lab node (Debian kernel over
this host's root, TCG) boots; decap_scenario.py runs there as root with network
namespaces as source node, destination node, third host, client and VM (a veth stands in
for the tap), and katamaran.network's own classes in the order source.py/dest.py use them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.lab_nodes]

SCENARIO = Path(__file__).with_name("decap_scenario.py")


@pytest.fixture(scope="module")
def facts(node_lab_config):
    from pytest_katamaran.lab.node import NoNodeImage, run_in_node

    try:  # a failing scenario raises NodeRunError with its last stderr line
        return run_in_node([str(SCENARIO)], results_dir=node_lab_config.results_dir, timeout=480)
    except NoNodeImage as err:
        pytest.skip(str(err))


def test_scoped_setup_without_warnings(facts):
    assert facts["scope_warning"] is None
    assert facts["source_warnings"] == [] and facts["dest_warnings"] == []
    assert facts["devices"]["tunnel"][0].startswith("kmr-")


def test_only_the_sources_packets_for_the_vm_reach_its_tap(facts):
    assert facts["ping"]["received"] == facts["ping"]["sent"] == 3
    # a third host tunnelling to the node (decapsulated on tunl0, Calico-style)
    assert facts["third"] == {"vm_echos": 0, "held": 0}
    # the source tunnelling a packet for another inner address (the VM has it too)
    assert facts["other"]["vm_echos"] == 0 and facts["other"]["held"] == 0


def test_full_size_packets_pass_the_tunnel(facts):
    assert facts["ping_1400"]["received"] == 3, facts["ping_1400"]
    assert facts["ping_1472"]["received"] == 3, facts["ping_1472"]


def test_two_migrations_share_the_tunnel_but_nothing_else(facts):
    assert facts["second"]["table"] and facts["second"]["hold"] != facts["devices"]["hold"]
    assert facts["shared_tunnel_kept"] and facts["dst_kept_for_second"]


def test_a_destination_starting_beside_another_does_not_sweep_its_new_tunnel(facts):
    """Two destinations starting at once: B's leftover sweep ran while A had created the
    shared tunnel and nothing of A used it yet.  B waited for A's lock, then found the
    device in use and kept it (before, it deleted it as "left by an earlier run": the
    two-VM hold case printed `removed tunnel kmr-...`)."""
    race = facts["setup_race"]
    assert race["fresh"] and race["tunnel_made"], race
    assert race["sweep_waited"], race
    assert race["tunnel_kept"] and race["swept"] == [], race
    assert race["gone_after"], race  # A, its last user, removed it


def test_hold_holds_and_its_end_drops_nothing_at_10ms(facts):
    assert facts["held_at_resume"] > 0 and facts["vm_echos_while_held"] == 0
    ping = facts["hold_ping"]
    lost = facts["hold_lost"]  # which seqs, and the phase marks (s after the first ping)
    assert ping["sent"] == 700 and ping["received"] == 700 and ping["dups"] == 0, (ping, lost)
    assert facts["plug_drops"] == 0 and facts["tunnelled"] > facts["held_at_resume"]


def test_nothing_left_after_cleanup(facts):
    for ns in ("src", "dst"):
        left = facts["leftovers"][ns]
        assert left["kmr_links"] == [] and left["rules"] == [] and left["routes"] == [], left
        assert left["neigh"] == "", left
        assert facts["after"][ns] == facts["before"][ns]
    assert "plug" not in facts["leftovers"]["dst"]["tap_qdisc"]


def test_ipv6_over_ipv4_and_ipv4_over_ipv6_work_end_to_end(facts):
    v6_in_v4, v4_in_v6 = facts["mixed"]["v6_in_v4"], facts["mixed"]["v4_in_v6"]
    assert v6_in_v4["devices"][0].startswith("kmrs-") and v6_in_v4["warnings"] == []
    assert v6_in_v4["ping"]["received"] == 3 and v6_in_v4["held"] >= 3, v6_in_v4
    assert v6_in_v4["full"]["received"] == 3, v6_in_v4  # 1500-byte IPv6 packets through sit
    assert v4_in_v6["devices"][0].startswith("kmr6-") and v4_in_v6["warnings"] == []
    assert v4_in_v6["ping"]["received"] == 3 and v4_in_v6["held"] == 3, v4_in_v6
    # what the source reports lost when it gives up after the switch: counted on the tunnel
    assert v6_in_v4["tunnelled"] >= 6 and v4_in_v6["tunnelled"] == 3, facts["mixed"]


def test_without_source_ip_the_fallback_is_still_scoped_to_the_vm(facts):
    fallback = facts["fallback"]
    assert fallback["scope"].startswith("-source-ip not given: packets tunnelled from ANY host")
    assert "a source node reached over IPv6 needs -source-ip" in fallback["scope"]
    assert fallback["devices"] == ["tunl0"] and fallback["warnings"] == []
    # the third host's 3 pings to the VM are steered (that is what cannot be scoped), its
    # 3 pings to the VM's other address are not; tunl0 stays up (it was up before)
    assert fallback["third_to_vm_echos"] == 3 and fallback["tunl0_up"]


def test_installing_and_removing_the_hold_does_not_disturb_the_tap(facts, record_property):
    """The hold veth's plug and redirect come and go 30 times under a 2 ms ping to the
    tap's VM: nothing lost.  (The same churn of a plug as the tap's root qdisc, the old
    hold, is recorded for comparison: it lost 8-10 of 3000 when measured by hand.)"""
    churn = facts["churn"]
    record_property("tap_root_qdisc_churn", churn["tap_root_qdisc"])
    assert churn["hold_veth"] == {"sent": 3000, "received": 3000}, churn
