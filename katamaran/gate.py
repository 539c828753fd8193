"""The switchover gate: QEMU cannot pause the VM by itself before katamaran's divert.

Why.  Where katamaran decides the switchover (Source._take_switchover_decision), QEMU's
own convergence test has a 1-byte threshold, yet QEMU still pauses the VM by itself at
a dirty sync that finds nothing dirty (an idle guest), and that can come right after
the first RAM pass, before katamaran has diverted the tap's feed.  As QEMU stops the
vCPUs, before it even sends STOP, its main loop may read one frame off the tap; the
paused NIC cannot take it, so QEMU parks it in its own queue, where it dies with the
source.  Nothing done after the STOP reaches it: the fresh-clone CI e2e lost 1 ping
that way in 2 runs of 4 (2026-11-30).

How.  QEMU's test adds up everything still pending, and a dirty bitmap that migrates
(capability `dirty-bitmaps`) counts as pending until the device state is sent:
ceil(disk size / granularity), at least 1.  With one such bitmap and the 1-byte
threshold, QEMU sends the first pass and then waits: no dirty sync, no pause (status
`active`, RAM remaining 0, `dirty-sync-count` 1; `waits_at_gate`).  katamaran diverts
and drains the tap with the VM still running, and only then opens the gate, with QEMU's
own switchover test back where it is katamaran's (Source._hand_back_test), else at
downtime-limit `pending + 1` ms at 1000 B/s (QEMU may again pause the VM when nothing is
dirty): either way no frame can reach the tap any more.
tests/integration/test_gate.py: QEMU 10.0, an idle VM, 3 s at the gate without a sync
or a pause; without the bitmap QEMU pauses the same VM itself within 2 dirty syncs.

Costs.  While QEMU waits at the gate its migration thread spins, writing a few bytes of
end-of-section markers per turn (~10 MB/s measured on this machine): katamaran caps the
bandwidth as soon as it sees the gate (Source._hold_at_gate).  The bitmap is disabled
(it tracks nothing).  The destination gets it on the node of the same name and its
katamaran removes it at RESUME (`remove_all`); a destination without that node
drops it with one line in its QEMU log, and the migration goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import QMPCommandError
from .qmp import Monitor

BITMAP = "katamaran-switchover-gate"
GRANULARITY = 1 << 31  # QEMU's largest: the fewest pending units (1 per 2 GiB of disk)
CAPABILITY = "dirty-bitmaps"


def waits_at_gate(info: dict[str, Any]) -> bool:
    """Whether `query-migrate` shows QEMU done with its first pass and held at the gate."""
    ram = info.get("ram") or {}
    return (
        info.get("status") == "active"
        and ram.get("dirty-sync-count") == 1
        and ram.get("remaining") == 0
    )


def _bitmap_names(node: dict[str, Any]) -> list[str]:
    """Its named bitmaps: an unnamed one (a mirror's own) never migrates."""
    return [b["name"] for b in node.get("dirty-bitmaps") or [] if b.get("name")]


@dataclass
class SwitchoverGate:
    """One closed gate on a source QEMU (see the module docstring)."""

    mon: Monitor
    node: str  # the drive's own node (QEMU migrates the bitmap under the drive's name)
    pending: int  # what the bitmap adds to QEMU's test: ceil(size / GRANULARITY)
    opened: bool = False

    @classmethod
    async def place(cls, mon: Monitor, drive: str) -> tuple[SwitchoverGate | None, str]:
        """Add the bitmap to `drive`, the gate still open; (None, why not) where it cannot
        be.  Before any mirror starts: the mirror puts a filter node (auto-named) on
        top of the drive, and a bitmap added by the drive's name then would land on that
        filter, which QEMU refuses to migrate ("in a node with auto-generated name"; the
        nested e2e, 2026-11-30).  Below the filter, it migrates under the drive's name."""
        caps = {c["capability"] for c in await mon.execute("query-migrate-capabilities")}
        if CAPABILITY not in caps:
            return None, f"this QEMU cannot migrate dirty bitmaps ({CAPABILITY})"
        nodes = await mon.execute("query-named-block-nodes", {"flat": True})
        theirs = sorted({n for node in nodes for n in _bitmap_names(node) if n != BITMAP})
        if theirs:
            # All of them would migrate with ours, and a bitmap on an unnamed node
            # makes QEMU refuse the whole migration.
            return None, f"the VM's disks carry dirty bitmaps of their own ({', '.join(theirs)})"
        size = node = None
        for block in await mon.execute("query-block"):
            inserted = block.get("inserted") or {}
            if drive in (block.get("device"), inserted.get("node-name")):
                size = (inserted.get("image") or {}).get("virtual-size")
                node = inserted.get("node-name")
        if not (size and node):
            return None, f"no drive {drive} to hold the gate's bitmap"
        # By its node name: later the drive's name leads to the mirror's filter.
        gate = cls(mon, node, -(-int(size) // GRANULARITY))
        await gate.remove()  # a killed earlier run's
        await mon.execute(
            "block-dirty-bitmap-add",
            {"node": node, "name": BITMAP, "granularity": GRANULARITY, "disabled": True},
        )
        return gate, ""

    async def close(self) -> None:
        """From the next `migrate` on, QEMU waits after its first pass."""
        await self.mon.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": CAPABILITY, "state": True}]},
        )

    def open_limit(self) -> int:
        """The downtime-limit (ms, at 1000 B/s: bytes) that lets QEMU sync again."""
        return self.pending + 1

    async def remove(self) -> None:
        """Drop the bitmap (once the migration has ended: QEMU keeps it busy until then)."""
        try:
            await self.mon.execute("block-dirty-bitmap-remove", {"node": self.node, "name": BITMAP})
        except QMPCommandError as err:
            if "not found" not in str(err).lower():
                raise


async def remove_all(mon: Monitor) -> list[str]:
    """Remove every gate bitmap on this QEMU; the nodes it was on.  On the destination:
    the one that came with the VM.  On a source: one a killed katamaran left (not while
    a migration runs: QEMU keeps it busy until the migration has ended)."""
    removed = []
    for node in await mon.execute("query-named-block-nodes", {"flat": True}):
        if BITMAP in _bitmap_names(node):
            name = node["node-name"]
            await mon.execute("block-dirty-bitmap-remove", {"node": name, "name": BITMAP})
            removed.append(name)
    return removed
