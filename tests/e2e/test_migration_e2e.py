"""E2E: a Kata pod migrates from node A to node B under a continuous ping with zero loss.

Why: this is the proof of the network cutover (IPIP tunnel at STOP, sch_plug until
RESUME, CNI convergence during the tunnel hold) that the host kernel cannot run: the
node VMs boot Debian's kernel, which has ipip and sch_plug.  The plugin's fixtures do
the work (``kata_pod``: a Kata-shaped sandbox writing its disk; ``migrate``: the guide's
flow with the real katamaran CLI on both nodes); this file is the test a user writes.
Tuning (holds, converge delay, writer rate, ping rate under TCG): ``pytest --help``,
section katamaran.
"""

from __future__ import annotations

import pytest

from pytest_katamaran import assert_zero_drop

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("shared_storage", [False, True], ids=["nbd", "shared"])
def test_migration_zero_drop(kata_pod, migrate, ping, node_a, node_b, shared_storage, results):
    pod = kata_pod(node_a, shared_storage=shared_storage)
    results["pod_accel"] = pod.accel  # kvm: under the node's KVM, pinged at the guide's rate
    # The zero-drop witness: node A's cluster address pings the pod all along.
    pinger = ping(node_a, pod)
    pinger.wait_replies(50)

    moved = migrate(pod, to=node_b, ping=pinger)  # the ping ends with the migration
    results["migration"] = moved.as_dict()
    assert moved.ok, moved.explain(pinger)

    stats = results["ping"] = pinger.finish()
    assert_zero_drop(stats)
    assert stats.last_reply_ts > moved.hold_end, f"pod went quiet in the hold: {stats.describe()}"

    writes = moved.pod.verify_writes()  # every acknowledged write, before and after the move
    results["disk"] = str(writes)
    assert writes.ok, writes
