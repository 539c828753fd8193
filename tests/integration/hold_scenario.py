"""Faults in the tunnel hold and at the switchover gate, with the real cutover, run as root
inside a Debian-kernel node.

Why a script: the hold needs ipip and sch_plug, which this host's kernel lacks, so
test_hold_faults.py boots one lab node (pytest_katamaran.lab.node) and runs this there.
Each case is one real migration in `locallab.Rig` (two netns nodes, a Kata-shaped pod on
node a, QEMU from the command line, katamaran's CLI on both sides at the default 5 s
hold, the CNI step 2 s after `migration completed`) with a client pinging the VM every
10 ms through it (slower where the nested guest cannot answer that: the case probes it
first, pytest_katamaran.checks.pace), and one fault once the hold has begun: a signal
to either katamaran, a SIGKILL followed by a re-run with the same flags, the destination
QEMU killed; or a signal to the source at the switchover gate (the VM running, its
packets kept), at the pause (the VM paused, its packets kept, no `migrate-continue` yet)
or just after the switch (`migrate-continue` sent, the VM's traffic in the tunnel); a
signal to the destination while the source is stopped at the pause.

Each fault is placed by a line katamaran prints (the hold has begun), not by a sleep; the
gate, pause and switch cases arm the source's `gate-held` / `paused` / `switched`
failpoint (katamaran.failpoint) and signal once it has stopped there.

Prints one JSON object: per case the exit codes, both logs, both QEMUs' states, the
ping's figures and what each node's network (links, rules, routes, qdiscs, sysctls)
holds afterwards that it did not hold before; the test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from katamaran import failpoint
from pytest_katamaran.bench.ping_rate import (
    CONVERGE_DELAY,
    DEST_IP,
    SOURCE_IP,
    Client,
    answer_rate,
)
from pytest_katamaran.checks.drops import DROPS_CMD, drops_delta, parse_drops

# HEADROOM: these cases test katamaran's faults, not the lab's capacity (checks.pace)
from pytest_katamaran.checks.pace import HEADROOM, Pace, pace
from pytest_katamaran.checks.ping import PingMonitor, PingStats
from pytest_katamaran.lab.local import VM_IP, Rig, wait_for_text, wait_stopped
from pytest_katamaran.lab.nested import NestedGuests
from pytest_katamaran.lab.nested import add_flags as nested_flags
from pytest_katamaran.migration import plug_limit
from pytest_katamaran.qemu.accel import ACCEL_CHOICES

INTERVAL = 0.01  # the guide's; slower where the nested guest cannot answer it (Case.pace)
HOLD = "5"  # katamaran's default -tunnel-hold, on both sides
VM2_IP = "10.244.1.6"  # the second VM of the two-VM case (its tap: tap1_kata)
VM2_PORTS = ("-nbd-port", "10811", "-migration-port", "4445")
# Each VM's ping.  Four TCG QEMUs share the node here, and a guest that lags so far that
# its receive ring (256) fills has QEMU park one frame, which QEMU drops when it pauses the
# VM (not reachable from outside; README "nested lab").  At 20 ms each one run lost 1 ping
# of 2392 at VM 1's pause (RTT up to 10.4 s: 500 pending), no node counter moving; at 50 ms
# a 10 s lag leaves 200 pending, inside the ring.
TWO_VM_INTERVAL = 0.05
STALL_S = 12.0  # a stalled destination VM: 1200 pings at 10 ms, past a 1000-frame ring
GATE_STOP_S = 0.5  # the source stopped at the gate: ~50 of the client's packets kept
SYSCTLS = ("forwarding", "rp_filter", "ip_forward", "accept_local")  # compared per case


def _say(message: str) -> None:
    print(f"hold_scenario: {message}", file=sys.stderr, flush=True)


def _sh(netns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True)
    return done.stdout


def network_state(netns: str) -> set[str]:
    """What katamaran may add or change in a netns, one line per item (no counters)."""
    lines = {f"link {ln.split(':')[1].strip().split('@')[0]}" for ln in
             _sh(netns, "ip", "-o", "link", "show").splitlines() if ":" in ln}  # fmt: skip
    for family in ("-4", "-6"):
        lines |= {
            f"rule{family} {ln.strip()}" for ln in _sh(netns, "ip", family, "rule").splitlines()
        }
        routes = _sh(netns, "ip", family, "route", "show", "table", "all").splitlines()
        # the main table's routes to the VM are the CNI's step, not katamaran's
        lines |= {f"route{family} {ln.strip()}" for ln in routes
                  if not (ln.split()[:1] in ([VM_IP], [VM2_IP]) and "table" not in ln)}  # fmt: skip
    lines |= {f"qdisc {ln.strip()}" for ln in _sh(netns, "tc", "qdisc", "show").splitlines()}
    for ln in _sh(netns, "sysctl", "-a").splitlines():
        name = ln.split("=")[0].strip()
        if any(part in name for part in SYSCTLS):
            lines.add(f"sysctl {ln.strip()}")
    # IPv6 link-local routes come and go with DAD on the lab's own links; a tap whose
    # QEMU died is `linkdown`: neither is katamaran's (its links are listed by name)
    return {ln.replace(" linkdown", "") for ln in lines if "fe80:" not in ln}


def drops(netns: str) -> dict[str, int]:
    """Every drop counter of a netns (pytest_katamaran.checks.drops), for the facts."""
    return parse_drops(_sh(netns, "sh", "-c", DROPS_CMD))


class Case:
    """One migration under ping with one fault in the hold; `facts` holds what was seen."""

    def __init__(self, name: str, rig: Rig, client: Client, paced: Pace) -> None:
        self.name, self.rig, self.client = name, rig, client
        self.interval = paced.interval
        self.netns = {"a": rig.lab.a.netns, "b": rig.lab.b.netns}
        if rig.pod is not None:
            self.netns["pod"] = rig.pod.netns
        self.before = {node: network_state(ns) for node, ns in self.netns.items()}
        self.netns["client"] = client.netns  # counted for drops, not for leftovers
        self.drops_before = {node: drops(ns) for node, ns in self.netns.items()}
        self.facts: dict[str, Any] = {"case": name, "pace": paced.as_dict()}
        self.t0 = time.monotonic()

    def stamp(self, what: str) -> None:
        self.facts.setdefault("marks", {})[what] = round(time.monotonic() - self.t0, 2)

    def katamaran(
        self, side: str, log: str, env: dict[str, str] | None = None, *ports: str
    ) -> subprocess.Popen:
        """katamaran with the flags the e2e gives it (a re-run gets the very same);
        `ports`: -nbd-port/-migration-port for a second migration at once."""
        rig = self.rig
        if side == "source":
            args = ["-mode", "source", "-qmp", str(rig.src.qmp_path), "-dest-ip", DEST_IP]
            args += ["-vm-ip", rig.vm_ip, "-tunnel-hold", HOLD, *ports]
            return rig.katamaran("a", *args, log=log, env=env)
        args = ["-mode", "dest", "-qmp", str(rig.dst.qmp_path), "-tap", rig.tap]
        args += ["-vm-ip", rig.vm_ip, "-source-ip", SOURCE_IP, "-tunnel-hold", HOLD, *ports]
        args += ["-plug-limit", str(plug_limit(30.0, self.interval))]
        return rig.katamaran("b", *args, log=log)

    def converge(self) -> None:
        """The CNI's step: node b routes the VM to its tap (its MAC pinned, as Felix
        does and the e2e's converge), node a routes it to node b."""
        assert self.rig.dest_tap is not None and self.rig.pod is not None
        self.rig.dest_tap.add_pod_route(vm_mac=self.rig.pod.mac)
        route = ["ip", "route", "replace", f"{self.rig.vm_ip}/32", "via", DEST_IP]
        self.rig.lab.run("a", route, check=True)
        self.stamp("converged")

    def left(self) -> dict[str, dict[str, list[str]]]:
        """Per node: lines present now and not before (`added`), and the other way."""
        out = {}
        for node, ns in self.netns.items():
            if node == "client":
                continue
            now = network_state(ns)
            out[node] = {
                "added": sorted(now - self.before[node]),
                "removed": sorted(self.before[node] - now),
            }
        return out

    def count_drops(self) -> None:
        """Every drop counter that moved since the case began; read while the pings still
        run, as a socket's drops go with it."""
        now = {node: drops(ns) for node, ns in self.netns.items()}
        self.facts["drops"] = {n: drops_delta(self.drops_before[n], now[n]) for n in now}

    def record_end(self, stats: PingStats, logs: list[str]) -> None:
        """The case's outcome: the ping's figures, both QEMUs' states, what is left on
        each node, and katamaran's logs."""
        ping = stats.as_dict()
        ping.pop("in_flight", None)
        self.facts.update(
            ping=ping,
            source_status=self.status("source"),
            dest_status=self.status("dest"),
            left=self.left(),
            logs={name: self.rig.log(name).splitlines() for name in logs},
        )

    def status(self, side: str) -> str:
        box = self.rig.src if side == "source" else self.rig.dst
        if not box.alive():
            return "dead"
        return self.rig.status(box)


@dataclass(frozen=True)
class Fault:
    """`place(case, procs)` runs once the source's hold has begun, or, with `failpoint`,
    once the source katamaran has stopped itself there (see katamaran.failpoint)."""

    place: Callable[[Case, dict], None]
    failpoint: str = ""
    ping_size: int = 0  # ICMP payload bytes (ping -s); 0: ping's default 56


def run_case(name: str, rig: Rig, client: Client, fault: Fault, paced: Pace) -> dict:
    """Migrate under ping with one fault (see Fault)."""
    case = Case(name, rig, client, paced)
    size = ("-s", str(fault.ping_size)) if fault.ping_size else ()
    case.facts["ping_size"] = fault.ping_size or 56
    mon = PingMonitor.local(VM_IP, case.interval, netns=client.netns, extra_args=size).start()
    try:
        mon.wait_replies(10, timeout=300)
        procs = {"dest": case.katamaran("dest", "dest.log")}
        rig.wait_for_line("dest.log", "destination ready", rig.ready_timeout, procs["dest"])
        env = {failpoint.ENV: fault.failpoint} if fault.failpoint else None
        procs["source"] = case.katamaran("source", "source.log", env=env)
        if fault.failpoint:
            wait_stopped(procs["source"], 900)
            case.stamp(f"source stopped at {fault.failpoint}")
        else:
            wait_for_text(rig.tmp / "source.log", "holding tunnel", 900, procs["source"])
            case.stamp("source hold began")
        fault.place(case, procs)
        for side in ("source", "dest"):
            case.facts[f"{side}_rc"] = rig.finish(procs[side], 300)
        case.stamp("both exited")
        case.count_drops()
        stats = mon.finish(catch_up_s=30.0, settle_s=1.0)
    finally:
        mon.stop()  # idempotent
    case.record_end(stats, sorted(n for n in os.listdir(rig.tmp) if n.endswith(".log")))
    return case.facts


def run_two_vms(name: str, rig: Rig, client: Client, paced: Pace) -> dict:
    """Two VMs on node a migrate to node b at the same time through the real cutover,
    each with its own ports, pod netns and node-b tap, both tunnelled over the one
    `kmr-` device the kernel allows between two nodes; the client pings both all along
    (every TWO_VM_INTERVAL each)."""
    second = Rig(
        rig.guest,
        rig.tmp / "vm2",
        kata_pod=True,
        qemu=rig.qemu,
        accel=rig.accel,
        boot_timeout=rig.boot_timeout,
        ready_timeout=rig.ready_timeout,
        lab=rig.lab,
        own_lab=False,
        tap="tap1_kata",
        vm_ip=VM2_IP,
    )
    second.tmp.mkdir()
    try:
        second.up()
        cases = [Case(name, rig, client, paced), Case(name, second, client, paced)]
        return _two_vms(name, cases)
    finally:
        second.down()


def _two_vms(name: str, cases: list[Case]) -> dict:
    ports: list[tuple[str, ...]] = [(), VM2_PORTS]
    mons: list[PingMonitor] = []
    procs: list[dict[str, subprocess.Popen]] = [{}, {}]
    facts: dict[str, Any] = {"case": name}
    try:
        for case in cases:  # each started one is stopped below, whatever fails
            case.interval = max(TWO_VM_INTERVAL, case.interval)  # its plug is sized for it
            mon = PingMonitor.local(case.rig.vm_ip, case.interval, netns=case.client.netns)
            mons.append(mon.start())
        for mon in mons:
            mon.wait_replies(10, timeout=300)
        for case, port, proc in zip(cases, ports, procs, strict=True):
            proc["dest"] = case.katamaran("dest", "dest.log", None, *port)
        for case, proc in zip(cases, procs, strict=True):
            case.rig.wait_for_line("dest.log", "destination ready", 600, proc["dest"])
        for case, port, proc in zip(cases, ports, procs, strict=True):
            proc["source"] = case.katamaran("source", "source.log", None, *port)
        for case, proc in zip(cases, procs, strict=True):
            wait_for_text(case.rig.tmp / "source.log", "migrating RAM", 900, proc["source"])
        # both in their RAM phase before either holds: the migrations overlap
        facts["both_under_way"] = all(p["source"].poll() is None for p in procs)
        for case, proc in zip(cases, procs, strict=True):
            wait_for_text(case.rig.tmp / "source.log", "holding tunnel", 900, proc["source"])
            case.stamp("source hold began")
        time.sleep(CONVERGE_DELAY)  # the CNI converges mid-hold, as in the e2e
        for case in cases:
            case.converge()
        for case, proc in zip(cases, procs, strict=True):
            for side in ("source", "dest"):
                case.facts[f"{side}_rc"] = case.rig.finish(proc[side], 300)
            case.stamp("both exited")
        for case in cases:
            case.count_drops()
        stats = [mon.finish(catch_up_s=30.0, settle_s=1.0) for mon in mons]
    finally:
        for mon in mons:
            mon.stop()  # idempotent
    for key, case, stat in zip(("vm1", "vm2"), cases, stats, strict=True):
        case.record_end(stat, ["source.log", "dest.log"])
        facts[key] = case.facts
    return facts


def signal_source(sig: signal.Signals) -> Callable[[Case, dict], None]:
    def fault(case: Case, procs: dict) -> None:
        time.sleep(CONVERGE_DELAY)  # the CNI converges mid-hold, as in the e2e
        case.converge()
        procs["source"].send_signal(sig)
        case.stamp(f"{sig.name} to the source")
        case.facts["source_rc_after_signal_s"] = _exited_within(procs["source"], 30)

    return fault


def signal_dest(sig: signal.Signals) -> Callable[[Case, dict], None]:
    def fault(case: Case, procs: dict) -> None:
        wait_for_text(case.rig.tmp / "dest.log", "migration received", 60, procs["dest"])
        time.sleep(CONVERGE_DELAY)
        case.converge()
        procs["dest"].send_signal(sig)
        case.stamp(f"{sig.name} to the destination")
        case.facts["dest_rc_after_signal_s"] = _exited_within(procs["dest"], 30)

    return fault


def sigkill_source_then_rerun(case: Case, procs: dict) -> None:
    """SIGKILL in the hold leaves the rule that tunnels the VM's address; the re-run
    (same flags, at once, as an operator's retry) must remove it before it refuses."""
    time.sleep(CONVERGE_DELAY)
    case.converge()
    procs["source"].kill()
    procs["source"].wait()
    case.stamp("SIGKILL to the source")
    case.facts["left_after_kill"] = case.left()
    rerun = case.katamaran("source", "source-rerun.log")
    case.facts["rerun_rc"] = case.rig.finish(rerun, 120)
    case.stamp("re-run exited")
    # Does the VM answer now?  (Until the re-run removed the rule, node a's packets went into
    # the tunnel; whether the destination still decapsulated them depends on how long the
    # re-run took, so the first ping's losses are a fact, not the check.)
    case.facts["ping_after_rerun"] = answer_rate(VM_IP, case.interval, case.client.netns, 3.0)


def sigkill_dest_then_rerun(case: Case, procs: dict) -> None:
    wait_for_text(case.rig.tmp / "dest.log", "migration received", 60, procs["dest"])
    time.sleep(CONVERGE_DELAY)
    case.converge()
    procs["dest"].kill()
    procs["dest"].wait()
    case.stamp("SIGKILL to the destination")
    # the source's hold ends first: until then its tunnel still carries the VM's packets
    case.facts["source_rc_first"] = case.rig.finish(procs["source"], 120)
    case.facts["left_after_kill"] = case.left()
    rerun = case.katamaran("dest", "dest-rerun.log")
    case.facts["rerun_rc"] = case.rig.finish(rerun, 120)
    case.stamp("re-run exited")


def kill_dest_qemu(case: Case, procs: dict) -> None:
    time.sleep(CONVERGE_DELAY)
    case.converge()
    pid = case.rig.dst.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the QEMU this scenario started, by its PID
    case.stamp("destination QEMU killed")


def signal_at_gate(sig: signal.Signals) -> Callable[[Case, dict], None]:
    """The source katamaran stopped at the gate: the VM runs, its feed is diverted and
    its packets are kept, QEMU waits for katamaran to open the gate.  Left so for
    GATE_STOP_S (the client's packets for the VM keep coming, into katamaran's divert),
    then signalled and continued: the signal is taken at its next await."""

    def fault(case: Case, procs: dict) -> None:
        source = procs["source"]
        time.sleep(GATE_STOP_S)  # how long the fault lasts, not a wait for something
        source.send_signal(sig)
        source.send_signal(signal.SIGCONT)
        case.stamp(f"{sig.name} and SIGCONT to the source")
        case.facts["source_rc_after_signal_s"] = _exited_within(source, 60)

    return fault


def signal_source_stopped(sig: signal.Signals, *, completes: bool) -> Callable[[Case, dict], None]:
    """The source stopped at its failpoint: the signal and SIGCONT at once (no added
    stop), so the window is what a signal at that moment would find.  Where the
    migration `completes` (after migrate-continue), the CNI's step comes mid-hold, as
    in the e2e."""

    def fault(case: Case, procs: dict) -> None:
        source = procs["source"]
        source.send_signal(sig)
        source.send_signal(signal.SIGCONT)
        case.stamp(f"{sig.name} and SIGCONT to the source")
        if completes:
            wait_for_text(case.rig.tmp / "source.log", "holding tunnel", 300, source)
            time.sleep(CONVERGE_DELAY)
            case.converge()
        case.facts["source_rc_after_signal_s"] = _exited_within(source, 60)

    return fault


def signal_dest_at_pause(case: Case, procs: dict) -> None:
    """The source stopped at the pause (the VM's packets kept by it, the destination's
    QEMU waiting for the rest of the migration): SIGTERM to the destination, then the
    source continues once the destination has exited."""
    procs["dest"].send_signal(signal.SIGTERM)
    case.stamp("SIGTERM to the destination")
    case.facts["dest_rc_after_signal_s"] = _exited_within(procs["dest"], 60)
    procs["source"].send_signal(signal.SIGCONT)


def dest_vm_stalls(case: Case, procs: dict) -> None:
    """The destination VM does not run for STALL_S right after it resumed: its QEMU is
    stopped (SIGSTOP), as a cold nested-TCG guest stalled in the e2e (pings answered
    after up to 10 s, 12 of them lost in one CI run).  Everything sent meanwhile waits
    in the tap's ring (sized by katamaran for the plug) and must be answered once the
    VM runs again; the CNI converges mid-stall, the holds end during it."""
    wait_for_text(case.rig.tmp / "dest.log", "VM resumed", 300, procs["dest"])
    pid = case.rig.dst.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the QEMU this scenario started, by its PID
    case.stamp("destination QEMU stopped")
    try:
        time.sleep(CONVERGE_DELAY)
        case.converge()
        time.sleep(STALL_S - CONVERGE_DELAY)  # the fault's length, not a wait for something
    finally:
        os.kill(pid, signal.SIGCONT)
    case.stamp("destination QEMU continued")


def _exited_within(proc: subprocess.Popen, timeout: float) -> float | None:
    t0 = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    return round(time.monotonic() - t0, 2)


CASES: dict[str, Fault] = {
    "sigint-source": Fault(signal_source(signal.SIGINT)),
    "sigterm-source": Fault(signal_source(signal.SIGTERM)),
    "sighup-source": Fault(signal_source(signal.SIGHUP)),
    "sigkill-source-rerun": Fault(sigkill_source_then_rerun),
    "sigterm-dest": Fault(signal_dest(signal.SIGTERM)),
    "sighup-dest": Fault(signal_dest(signal.SIGHUP)),
    "sigkill-dest-rerun": Fault(sigkill_dest_then_rerun),
    "dest-qemu-killed": Fault(kill_dest_qemu),
    **{
        f"{sig.name.lower()}-at-gate": Fault(signal_at_gate(sig), failpoint="gate-held")
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    },
    "sigterm-at-pause": Fault(
        signal_source_stopped(signal.SIGTERM, completes=False), failpoint="paused"
    ),
    "sigterm-dest-at-pause": Fault(signal_dest_at_pause, failpoint="paused"),
    # Full-size packets through the whole cutover: kept at the pause, sent into the
    # tunnel at migrate-continue, held in the destination's plug, released at RESUME.
    "sigterm-after-switch": Fault(
        signal_source_stopped(signal.SIGTERM, completes=True),
        failpoint="switched",
        ping_size=1400,
    ),
    "dest-vm-stalls": Fault(dest_vm_stalls),
}


def measure_pace(client: Client, ping_size: int = 0) -> Pace:
    """The client's ping interval: INTERVAL, or slower if the guest cannot answer it,
    probed with the case's own packet size (CI of 2026-12-02: paced at 20 ms with 56-byte
    probes, the after-switch case's 1400-byte pings lost 771 of 3644), at half the rate
    it kept up with when idle (HEADROOM: see pytest_katamaran.checks.pace)."""
    size = ("-s", str(ping_size)) if ping_size else ()

    def start(every: float, more: Sequence[str]) -> PingMonitor:
        args = (*size, *more)
        return PingMonitor.local(VM_IP, every, netns=client.netns, extra_args=args).start()

    return pace(start, INTERVAL, headroom=HEADROOM)


TWO_VMS = "two-vms"  # run_two_vms: no single fault, two migrations at once


def main() -> int:
    parser = argparse.ArgumentParser()
    nested_flags(parser)
    parser.add_argument("--cases", default=",".join([*CASES, TWO_VMS]))
    parser.add_argument("--accel", default="tcg", choices=ACCEL_CHOICES)
    args = parser.parse_args()
    nested = NestedGuests.from_args(args, args.accel)
    _say(nested.note)
    results = {}
    for name in args.cases.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"kmr-hold-{name}-"))
        rig = nested.rig(tmp)
        client = Client(rig.lab.a.netns, rig.lab.b.netns)
        t0 = time.monotonic()
        try:
            rig.up()
            client.up()
            _say(f"{name}: nested guest up in {time.monotonic() - t0:.0f} s")
            paced = measure_pace(client, CASES[name].ping_size if name in CASES else 0)
            _say(f"{name}: {paced.describe()}")
            if name == TWO_VMS:
                results[name] = run_two_vms(name, rig, client, paced)
            else:
                results[name] = run_case(name, rig, client, CASES[name], paced)
        except Exception as err:  # noqa: BLE001 - one case's failure is that case's fact
            results[name] = {"case": name, "error": f"{type(err).__name__}: {err}"[:4000]}
        finally:
            client.down()
            rig.down()
            shutil.rmtree(tmp, ignore_errors=True)
        facts = results[name]
        # the nested guests' accelerator (kvm: under the node's emulated SVM)
        facts["accel"] = nested.accel.name
        _say(
            f"{name}: exit source {facts.get('source_rc')} dest {facts.get('dest_rc')}, "
            f"lost {facts.get('ping', {}).get('lost_count')}, {facts.get('error', 'no error')}"
            f" ({time.monotonic() - t0:.0f} s)"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
