"""Your own migration test: a Kata pod moves from node A to node B under a ping, zero drops.

Only the installed plugin's public fixtures and API are used; nothing from this
repository's tests/.  Run it (two QEMU nodes are booted for the session, ~6 min under TCG):

    pytest --nodes=qemu examples/

Change what a migration does with katamaran flags (``migrate(pod, to=node_b,
downtime_limit=50)``) or the plugin's options (``pytest --help``, section katamaran:
``--tunnel-hold``, ``--writer-rate``, ``--kata=sandbox|runtime`` ...).
"""

from __future__ import annotations

import pytest

from pytest_katamaran import assert_zero_drop

pytestmark = pytest.mark.timeout(1500)  # node boot + nested TCG guest boot + migration


def test_kata_pod_migrates_with_zero_drop(kata_pod, migrate, ping, node_a, node_b):
    pod = kata_pod(node_a)  # a Kata pod writing its disk, on node A
    pinger = ping(node_a, pod)  # from node A's cluster address, all along
    pinger.wait_replies(50)

    moved = migrate(pod, to=node_b, ping=pinger)  # the ping ends with the migration
    assert moved.ok, moved.explain(pinger)
    print(f"moved in {moved.total_s} s, downtime {moved.downtime_ms} ms")

    assert_zero_drop(pinger.finish())
    writes = moved.pod.verify_writes()
    assert writes.ok, writes
