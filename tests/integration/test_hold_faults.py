"""Faults in the tunnel hold, with the real cutover: signals, SIGKILL and a re-run, a dead
destination QEMU; each side exits as documented and leaves nothing on either node.

Why a node VM: the hold needs ipip and sch_plug, which this host's kernel lacks.  One lab
node (Debian kernel over this host's root, TCG) boots; hold_scenario.py runs there as
root, one real migration per case (nested guest, under the node's KVM where a real boot
proves it, as the e2e's pods; both katamaran CLIs at the default
hold, a client pinging the VM every 10 ms or, where the nested guest cannot answer that
many, at the rate it was measured to answer (pytest_katamaran.checks.pace), the CNI step
mid-hold) and one fault each,
placed by the line katamaran prints when its hold begins, or, at the switchover gate and
just after the switch (states of a few milliseconds), by a failpoint where the source
stops itself (katamaran.failpoint).
"""

from __future__ import annotations

import os
import re

import pytest

from pytest_katamaran.qemu.accel import ACCEL_CHOICES

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.lab_nodes,  # run-tests.sh runs these one module at a time, after the rest
    pytest.mark.timeout(3600),
]

SCENARIO = __file__.replace("test_hold_faults.py", "hold_scenario.py")
# One signal per place (each of SIGINT, SIGTERM, SIGHUP runs somewhere): katamaran takes
# the three through one handler, and each case costs a nested boot in a run that must stay
# inside CI's time.  hold_scenario.py keeps the others (`--cases
# sigint-source,sigterm-source,...`): all passed in every full run until 2026-12-02.
SIGNAL_CASES = ["sighup-source"]
DEST_SIGNAL_CASES = ["sigterm-dest"]
GATE_CASES = ["sigint-at-gate"]
OTHER_CASES = [
    "sigkill-source-rerun",
    "sigkill-dest-rerun",
    "dest-qemu-killed",
    "sigterm-at-pause",
    "sigterm-dest-at-pause",
    "sigterm-after-switch",
    "dest-vm-stalls",
    "two-vms",
]
ALL_CASES = SIGNAL_CASES + DEST_SIGNAL_CASES + GATE_CASES + OTHER_CASES
# What runs by default: all 11.  With the nested guests under the node's KVM (one-vCPU
# node, see HOLD_ACCEL) the 11 took 702 s on 2026-12-03 (guest up in 13-15 s, 48-99 s per
# case); under nested TCG on 2026-12-02 a case took ~7 min, and the default was 4 cases.
# KATAMARAN_HOLD_CASES=a,b,... runs those; KATAMARAN_HOLD_CASES=all is the default.
DEFAULT_CASES = ALL_CASES
HOLD_CASES_ENV = "KATAMARAN_HOLD_CASES"
# The nested guests' accelerator, as the e2e's pods (--pod-accel's default): under the
# node's KVM where a real boot proves it (then a one-vCPU node: qemu.node.node_cpus),
# else TCG, paced.  KATAMARAN_HOLD_ACCEL=tcg keeps the old lab (two vCPUs, nested TCG).
HOLD_ACCEL = os.environ.get("KATAMARAN_HOLD_ACCEL", "auto")
if HOLD_ACCEL not in ACCEL_CHOICES:
    raise pytest.UsageError(
        f"KATAMARAN_HOLD_ACCEL must be one of {', '.join(ACCEL_CHOICES)}; got {HOLD_ACCEL!r}"
    )


def chosen_cases() -> list[str]:
    asked = os.environ.get(HOLD_CASES_ENV, "").strip()
    if not asked:
        return DEFAULT_CASES
    if asked == "all":
        return ALL_CASES
    names = [n.strip() for n in asked.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_CASES))
    if unknown:
        raise pytest.UsageError(f"{HOLD_CASES_ENV}: unknown case(s) {', '.join(unknown)}")
    return names


SUITE = chosen_cases()


@pytest.fixture(scope="module")
def cases(node_lab_config, qemu_backports):
    from pytest_katamaran.images.guest import build_guest
    from pytest_katamaran.lab.nested import host_flags
    from pytest_katamaran.lab.node import NoNodeImage, run_in_node

    args = [SCENARIO, *host_flags(build_guest(), qemu_backports)]
    args += ["--cases", ",".join(SUITE), "--accel", HOLD_ACCEL]
    try:
        return run_in_node(
            args, results_dir=node_lab_config.results_dir, timeout=3000, pod_accel=HOLD_ACCEL
        )
    except NoNodeImage as err:
        pytest.skip(str(err))


def case_facts(cases: dict, name: str) -> dict:
    if name not in SUITE:
        pytest.skip(
            f"hold case {name!r} not in this run ({HOLD_CASES_ENV} lists the cases to run; "
            "unset or 'all' runs every one)"
        )
    assert name in cases, f"hold case {name!r} was asked for but left no result: {cases}"
    facts = cases[name]
    assert "error" not in facts, facts["error"]
    return facts


def kernel_leftovers(left: dict, *, sysctls: bool = True) -> dict:
    """Per node, what katamaran added or removed and did not put back."""
    out = {}
    for node, diff in left.items():
        lines = diff["added"] + diff["removed"]
        if not sysctls:
            lines = [ln for ln in lines if not ln.startswith("sysctl ")]
        if lines:
            out[node] = lines
    return out


def log_text(facts: dict, name: str) -> str:
    return "\n".join(facts["logs"].get(name, []))


def assert_no_loss(facts: dict) -> None:
    """Every ping answered, at the interval the guest was measured to answer (`pace`);
    if not, the message says where each node counted drops."""
    ping, paced = facts["ping"], facts["pace"]
    # never faster than the guest kept up with (two-vms pings each VM every 50 ms at least)
    assert ping["interval"] >= paced["interval"], (ping["interval"], paced)
    assert ping["sent"] > 0 and ping["lost_count"] == 0, loss_report(facts)


def loss_report(facts: dict) -> str:
    """Where the pings went, readable in CI's truncated output: the lost seqs with the
    case time each was sent at (ping starts with the case), the case's marks, every drop
    counter that moved, and the pace."""
    ping, interval = facts["ping"], facts["ping"]["interval"]
    lost = ping.get("lost", [])
    at = ""
    if lost:
        at = f" (sent at ~{lost[0] * interval:.1f}-{lost[-1] * interval:.1f} s)"
    return "\n".join(
        [
            f"lost {ping['lost_count']} of {ping['sent']} at {interval * 1000:g} ms: seqs "
            f"{ping.get('lost_ranges', '')}{at}",
            f"longest gap {ping.get('longest_gap_s')} s after seq "
            f"{ping.get('longest_gap_after_seq')}; rtt max {ping.get('rtt_max_ms')} ms",
            f"marks (s): {facts.get('marks')}",
            f"drops: {facts.get('drops')}",
            f"pace: {facts['pace'].get('description')}",
        ]
    )


def assert_given_back(source_log: str) -> None:
    """Given up before the switch: every packet katamaran kept went back to the VM."""
    given = re.search(r"(\d+) of (\d+) packet\(s\) kept for the tunnel given back", source_log)
    assert given and int(given[1]) == int(given[2]) > 0, source_log[-2000:]


@pytest.mark.parametrize("name", SIGNAL_CASES)
def test_signal_to_the_source_in_the_hold_cuts_it_short(cases, name):
    facts = case_facts(cases, name)
    source_log = log_text(facts, "source.log")
    assert "tunnel hold cut short; the migration has completed" in source_log
    assert facts["source_rc"] == 0, source_log[-2000:]
    assert facts["source_rc_after_signal_s"] is not None  # it did not sit out the hold
    assert facts["dest_rc"] == 0, log_text(facts, "dest.log")[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    assert kernel_leftovers(facts["left"]) == {}
    # the CNI had converged: nothing needed the tunnel any more
    assert_no_loss(facts)


def test_sigkill_in_the_source_hold_then_rerun_removes_the_tunnel_rule(cases, record_property):
    facts = case_facts(cases, "sigkill-source-rerun")
    killed = kernel_leftovers(facts["left_after_kill"])
    # the killed run's rule still sent the VM's address into the tunnel, ahead of the CNI
    assert any(ln.startswith("rule-4 90:") for ln in killed.get("a", [])), killed
    rerun = log_text(facts, "source-rerun.log")
    assert facts["rerun_rc"] == 1, rerun
    assert "has already migrated away" in rerun and "removed rule to 10.244.1.5" in rerun
    assert facts["dest_rc"] == 0, log_text(facts, "dest.log")[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    assert kernel_leftovers(facts["left"]) == {}
    # Until the re-run, node a's packets for the VM went into the tunnel: lost once the
    # destination stopped decapsulating (at most 60 s after its hold), so how many depends
    # on how soon the re-run came (0 of 1808 here alone, 1303 of 6992 under a second lab).
    record_property("lost_before_rerun", facts["ping"]["description"])
    after = facts["ping_after_rerun"]
    assert after["sent"] > 0 and after["lost_count"] == 0, after  # the way is clear again


@pytest.mark.parametrize("name", DEST_SIGNAL_CASES)
def test_signal_to_the_destination_in_the_hold_waits_for_a_quiet_tunnel(cases, name):
    facts = case_facts(cases, name)
    dest_log = log_text(facts, "dest.log")
    assert "tunnel hold cut short: decapsulating only until the source's tunnel" in dest_log
    assert "decapsulation removed" in dest_log
    assert facts["dest_rc"] == 0, dest_log[-2000:]
    assert facts["dest_rc_after_signal_s"] is not None
    assert facts["source_rc"] == 0, log_text(facts, "source.log")[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    assert kernel_leftovers(facts["left"]) == {}
    # it kept decapsulating what the source still tunnelled until the source's hold ended
    assert_no_loss(facts)


def test_sigkill_in_the_destination_hold_then_rerun_removes_its_network(cases):
    facts = case_facts(cases, "sigkill-dest-rerun")
    killed = kernel_leftovers(facts["left_after_kill"], sysctls=False)
    assert any("kmrh-" in ln for ln in killed.get("b", [])), killed  # the hold veth stayed
    rerun = log_text(facts, "dest-rerun.log")
    assert facts["rerun_rc"] == 1, rerun
    assert "not waiting for an incoming migration" in rerun
    assert "removed a killed run's" in rerun and "hold veth kmrh-" in rerun
    assert facts["source_rc_first"] == 0
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    # links, rules, routes, qdiscs gone; the node-wide sysctls the killed run changed stay
    # (their old values died with it): documented in the README
    assert kernel_leftovers(facts["left"], sysctls=False) == {}
    # the killed run's decapsulation kept working until the source's hold ended
    assert facts["ping"]["lost_count"] == 0, (facts["ping"], facts.get("drops"))


def test_destination_qemu_killed_in_the_hold(cases):
    facts = case_facts(cases, "dest-qemu-killed")
    assert facts["source_rc"] == 0, log_text(facts, "source.log")[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "dead")
    assert kernel_leftovers(facts["left"]) == {}
    dest_log = log_text(facts, "dest.log")
    assert facts["dest_rc"] == 1, dest_log[-2000:]
    assert "after the VM resumed here: the destination QEMU is gone" in dest_log


@pytest.mark.parametrize("name", GATE_CASES)
def test_signal_at_the_switchover_gate_gives_the_kept_packets_back(cases, name):
    """The source stopped (failpoint `gate-held`) with the VM running, its feed diverted
    and its packets kept, QEMU held at the gate; then signalled.  Before the point of no
    return: cancelled, the feed and every kept packet given back, the VM runs on the
    source, nothing left on either node, no ping lost."""
    facts = case_facts(cases, name)
    sig = name.split("-")[0].upper()
    lines = facts["logs"]["source.log"]
    source_log = "\n".join(lines)
    assert "failpoint gate-held: stopped" in source_log
    assert "QEMU held at the switchover gate" in source_log  # the divert came first
    assert facts["source_rc"] == 130, source_log[-2000:]
    assert facts["source_rc_after_signal_s"] is not None
    assert "point of no return" not in source_log
    errors = [ln for ln in lines if "katamaran: error:" in ln]
    assert len(errors) == 1 and f"interrupted by {sig}" in errors[0], errors
    assert_given_back(source_log)
    assert facts["source_status"] == "running", source_log[-2000:]
    assert facts["dest_status"] != "running"  # never two running copies
    dest_log = log_text(facts, "dest.log")
    assert facts["dest_rc"] == 1 and "incoming migration failed" in dest_log, dest_log[-2000:]
    assert kernel_leftovers(facts["left"]) == {}
    assert_no_loss(facts)


def test_a_signal_at_the_pause_cancels_and_gives_the_kept_packets_back(cases):
    """The source stopped (failpoint `paused`) with the VM paused for the switchover, its
    feed diverted and its packets kept by katamaran, `migrate-continue` not sent; then
    SIGTERM.  Before the point of no return: cancelled at once, nothing went into the
    tunnel, so every kept packet goes back to the VM, which runs on the source; no ping
    lost, nothing left on either node.  (Until 2026-12-01 the traffic went into the
    tunnel at the STOP, and a cancel there lost what the destination's plug held: 11-15
    pings.)"""
    facts = case_facts(cases, "sigterm-at-pause")
    lines = facts["logs"]["source.log"]
    source_log = "\n".join(lines)
    assert "failpoint paused: stopped" in source_log
    assert "kept until migrate-continue" in source_log
    assert "now goes through" not in source_log  # nothing was switched
    assert "given up after the switch" not in source_log
    assert facts["source_rc"] == 130, source_log[-2000:]
    assert facts["source_rc_after_signal_s"] is not None
    assert "point of no return" not in source_log
    errors = [ln for ln in lines if "katamaran: error:" in ln]
    assert len(errors) == 1 and "interrupted by SIGTERM at the switchover" in errors[0], errors
    assert_given_back(source_log)
    assert facts["source_status"] == "running", source_log[-2000:]
    assert facts["dest_status"] != "running"  # never two running copies
    dest_log = log_text(facts, "dest.log")
    assert facts["dest_rc"] == 1 and "incoming migration failed" in dest_log, dest_log[-2000:]
    assert kernel_leftovers(facts["left"]) == {}
    assert_no_loss(facts)


def test_a_signal_to_the_destination_at_the_pause_cuts_its_migration(cases):
    """The source stopped at the pause (failpoint `paused`): its QEMU waits at
    `pre-switchover`, the destination's for the rest.  SIGTERM to the destination: it
    shuts the migration stream down, so its QEMU never runs the VM, and exits 130; the
    source, continued, cancels (before its point of no return), gives the VM its kept
    packets back, and the VM runs there; no ping lost, nothing left on either node.
    (Until 2026-12-01 the traffic went into the tunnel at the STOP, and the destination's
    plug dropped it: 48-52 pings.)"""
    facts = case_facts(cases, "sigterm-dest-at-pause")
    dest_log = log_text(facts, "dest.log")
    assert facts["dest_rc"] == 130, dest_log[-2000:]
    assert facts["dest_rc_after_signal_s"] is not None
    assert "incoming migration stream shut down" in dest_log, dest_log[-2000:]
    source_log = log_text(facts, "source.log")
    assert "failpoint paused: stopped" in source_log
    assert "now goes through" not in source_log  # nothing was switched
    assert facts["source_rc"] in (1, 3), source_log[-2000:]
    if facts["source_rc"] == 3:  # committed before it read the failure
        assert "QEMU resumed the VM on the source itself" in source_log, source_log[-2000:]
    assert_given_back(source_log)
    assert facts["source_status"] == "running", source_log[-2000:]
    assert facts["dest_status"] != "running"  # never two running copies
    assert kernel_leftovers(facts["left"]) == {}
    assert_no_loss(facts)


def test_a_signal_after_the_switch_lets_the_migration_finish(cases):
    """The source stopped (failpoint `switched`) just after migrate-continue and the
    switch: the VM's traffic goes into the tunnel, the destination's plug holds it; then
    SIGTERM.  Past the point of no return: the source says it does not cancel and waits
    for the outcome; the migration completes, nothing is lost, nothing is left.  The
    pings carry 1400 bytes: full-size packets kept at the pause, resent into the tunnel
    and released by the plug all arrive."""
    facts = case_facts(cases, "sigterm-after-switch")
    assert facts["ping_size"] == 1400
    source_log = log_text(facts, "source.log")
    for lost in ("could not be forwarded", "could not be sent"):  # too big for the tunnel
        assert lost not in source_log, source_log[-2000:]
    assert "failpoint switched: stopped" in source_log
    assert "migrate-continue sent: traffic for" in source_log  # the switch came after it
    assert "point of no return" in source_log
    # QEMU may complete while the source is stopped, and the source may read that first
    # (CI, 2026-12-02): either way past the point of no return, and it does not cancel.
    said = (
        "SIGTERM after migrate-continue: not cancelling",
        "SIGTERM after the migration completed: not cancelling",
    )
    assert any(line in source_log for line in said), source_log[-2000:]
    assert facts["source_rc"] == 0, source_log[-2000:]
    assert facts["source_rc_after_signal_s"] is not None
    assert facts["dest_rc"] == 0, log_text(facts, "dest.log")[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    assert kernel_leftovers(facts["left"]) == {}
    assert_no_loss(facts)


def test_a_destination_vm_that_stalls_after_resume_loses_nothing(cases):
    """The destination QEMU stopped for 12 s right after the VM resumed there (as a cold
    nested guest stalled in the e2e, answering after up to 10 s): 1200 pings wait in the
    tap's ring, which the destination katamaran sized for its plug, while both holds end
    and the CNI converges; once the VM runs, every one is answered."""
    facts = case_facts(cases, "dest-vm-stalls")
    marks = facts["marks"]
    assert marks["destination QEMU continued"] - marks["destination QEMU stopped"] >= 12.0
    assert facts["ping"]["longest_gap_s"] >= 10.0, facts["ping"]  # the stall held replies
    dest_log = log_text(facts, "dest.log")
    assert re.search(r"tap0_kata txqueuelen \d+ -> \d+", dest_log), dest_log[-2000:]
    assert facts["source_rc"] == 0, log_text(facts, "source.log")[-2000:]
    assert facts["dest_rc"] == 0, dest_log[-2000:]
    assert (facts["source_status"], facts["dest_status"]) == ("postmigrate", "running")
    assert kernel_leftovers(facts["left"]) == {}
    assert_no_loss(facts)


def test_two_vms_migrate_at_once_through_the_cutover(cases):
    """Two VMs from node a to node b at the same time, each with its own ports, pod and
    node-b tap, both tunnelled over the one device the kernel allows between two nodes
    (created by the first, removed by the last): both complete with nothing lost, and
    nothing of either is left."""
    facts = case_facts(cases, "two-vms")
    assert "error" not in facts, facts["error"]
    assert facts["both_under_way"]  # both in their RAM phase before either held
    for vm in ("vm1", "vm2"):
        one = facts[vm]
        source_log, dest_log = log_text(one, "source.log"), log_text(one, "dest.log")
        assert one["source_rc"] == 0, source_log[-2000:]
        assert one["dest_rc"] == 0, dest_log[-2000:]
        assert "WARNING" not in source_log + dest_log, (source_log + dest_log)[-2000:]
        assert (one["source_status"], one["dest_status"]) == ("postmigrate", "running")
        assert kernel_leftovers(one["left"]) == {}
        assert_no_loss(one)
    second = log_text(facts["vm2"], "dest.log")
    assert "on [::]:10811" in second and "on [::]:4445" in second, second
