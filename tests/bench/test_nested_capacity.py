"""Benchmark: how many pings per second the nested pod answers at 10 ms (no migration).

Run with ``python3 -m pytest tests/bench/test_nested_capacity.py --nodes=qemu -s``.
Why: the zero-drop e2e proves something only at a ping rate the nested TCG guest (a TCG
QEMU inside a TCG node) can answer while it writes its disk; this measures that rate
before anyone spends a full e2e run on it.  Like the other benchmarks it asserts no
speed (machines are shared and noisy): the figures go to the results JSON
(``window``: sent, answered, replies/s over ``WINDOW_S``; ``ping``: RTTs, answer rate)
and to the terminal.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(3600)]

INTERVAL_S = 0.01  # the guide's ping
WINDOW_S = 30.0


@pytest.mark.parametrize("writer_rate", [10, 2, 0], ids=["writer10", "writer2", "idle"])
def test_nested_guest_answer_rate(kata_pod, ping, node_a, results, writer_rate):
    options = {"writer_rate": writer_rate} if writer_rate else {"writer": False}
    pod = kata_pod(node_a, boot_timeout=2400.0, **options)
    pinger = ping(node_a, pod, interval=INTERVAL_S)
    before = pinger.wait_replies(20)
    # top over the window: where node A's CPU goes (the nested QEMU, ping, the agent)
    top = node_a.ssh.run(
        f"top -b -n 2 -d {WINDOW_S:g} -w 200 | awk '/^top -/{{n++}} n == 2' | head -n 16",
        timeout=WINDOW_S + 300,
    ).stdout
    after = pinger.snapshot()
    stats = pinger.finish(catch_up_s=60)
    sent, answered = after.sent - before.sent, after.received - before.received
    results["window"] = {
        "seconds": WINDOW_S,
        "interval_s": INTERVAL_S,
        "sent": sent,
        "answered": answered,
        "replies_per_s": round(answered / WINDOW_S, 1),
        "writer_rate": writer_rate,
    }
    results["ping"] = stats
    results["node_a_top"] = top
    print(
        f"\nnested guest at {INTERVAL_S * 1000:g} ms, writer {writer_rate}/s: "
        f"{answered} of {sent} answered in {WINDOW_S:g} s ({answered / WINDOW_S:.1f}/s); "
        f"whole run: {stats.describe()}\n{top}"
    )
    assert sent > 0 and stats.received > 0, stats.describe()
