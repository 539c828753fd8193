"""QMP steps both sides share: capabilities, parameters, state checks."""

from __future__ import annotations

from typing import Any

from .config import Config
from .qmp import Monitor

# Both sides get the same list: QEMU requires matching capabilities for some of them,
# and setting the source-only ones on the destination is harmless.  return-path: the
# destination tells the source whether it loaded the state, so the source's `completed`
# means the destination has the VM (and a failure there is reported, not swallowed).
CAPABILITIES = ("events", "auto-converge", "pause-before-switchover", "return-path")
# ... and the source's switchover gate (see gate), set only where it is closed.
SAVED_CAPABILITIES = (*CAPABILITIES, "dirty-bitmaps")
# Every migration parameter katamaran may change (saved first, restored on every exit).
# QEMU checks max-cpu-throttle >= cpu-throttle-initial, so both move together.
THROTTLE_PARAMS = ("cpu-throttle-initial", "max-cpu-throttle")
# QEMU 8.2+: the bandwidth its switchover test assumes (0: the one it measures).
SWITCHOVER_BANDWIDTH = "avail-switchover-bandwidth"
PARAMETERS = ("downtime-limit", "max-bandwidth", SWITCHOVER_BANDWIDTH, *THROTTLE_PARAMS)
ACTIVE_STATES = {"setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active"}
# 1 ms, not 0: with 0 QEMU switches over at the end of the first pass, before any sync.
OWN_SWITCHOVER_LIMIT_MS = 1
# bytes/s assumed for QEMU's own switchover test while katamaran decides (see
# Source._take_switchover_decision): with the 1 ms limit, a 1-byte threshold.
OWN_SWITCHOVER_BANDWIDTH = 1000
MAX_DOWNTIME_LIMIT_MS = 2_000_000  # QEMU's ceiling (MAX_MIGRATE_DOWNTIME): "switch over now"
UNCAPPED = 1 << 62  # bytes/s; QEMU's default cap (32 MiB/s) would dominate migration time


async def snapshot(mon: Monitor) -> dict[str, dict[str, Any]]:
    """The values of every capability and parameter katamaran may change, before it does."""
    caps = {c["capability"]: c["state"] for c in await mon.execute("query-migrate-capabilities")}
    params = await mon.execute("query-migrate-parameters")
    return {
        "capabilities": {name: caps[name] for name in SAVED_CAPABILITIES if name in caps},
        "parameters": {name: params[name] for name in PARAMETERS if name in params},
    }


async def restore(mon: Monitor, saved: dict[str, dict[str, Any]]) -> list[str]:
    """Put back what `snapshot` saw; returns the names that had to change.

    Parameters first: QEMU accepts them at any time, capabilities only while no
    migration is running (then this raises and the caller reports it).
    """
    changed: list[str] = []
    params = await mon.execute("query-migrate-parameters")
    wanted = {k: v for k, v in saved.get("parameters", {}).items() if params.get(k) != v}
    if wanted:
        await mon.execute("migrate-set-parameters", wanted)
        changed += wanted
    now = {c["capability"]: c["state"] for c in await mon.execute("query-migrate-capabilities")}
    caps = {k: v for k, v in saved.get("capabilities", {}).items() if now.get(k) != v}
    if caps:
        states = [{"capability": k, "state": v} for k, v in caps.items()]
        await mon.execute("migrate-set-capabilities", {"capabilities": states})
        changed += caps
    return changed


async def set_capabilities(mon: Monitor) -> None:
    caps = [{"capability": name, "state": True} for name in CAPABILITIES]
    await mon.execute("migrate-set-capabilities", {"capabilities": caps})


async def set_parameters(mon: Monitor, cfg: Config) -> None:
    await mon.execute(
        "migrate-set-parameters",
        {"downtime-limit": cfg.downtime_limit_ms, "max-bandwidth": UNCAPPED},
    )


async def tcg_dirty_tracking_is_reliable(mon: Monitor) -> bool:
    """Whether many RAM passes are safe: KVM, or QEMU 9.0+ under TCG (see
    tcg_dirty_tracking_flaw)."""
    return await tcg_dirty_tracking_flaw(mon) is None


async def tcg_dirty_tracking_flaw(mon: Monitor) -> str | None:
    """A warning when this QEMU's migration can lose guest stores: TCG before 9.0.

    QEMU before 9.0 could lose pages a TCG vCPU dirtied during a bitmap sync (fixed
    upstream by "physmem: Fix migration dirty bitmap coherency with TCG memory
    access").  Seen here with QEMU 7.2: the more syncs, the likelier the destination
    guest finds its virtio rings corrupt ("virtio_blk: id 0 is not a head"); even with
    QEMU's fewest passes its kernel panicked after 3 of 65 migrations of a guest
    writing its disk (tests/e2e/test_nodeside.py, 2026-12-02).  No tool can migrate
    such a VM safely, so the operator is told, not refused: KVM (what Kata runs) is
    unaffected.
    """
    if (await mon.execute("query-kvm")).get("enabled"):
        return None
    version = (await mon.execute("query-version"))["qemu"]
    if (version["major"], version["minor"]) >= (9, 0):
        return None
    number = f"{version['major']}.{version['minor']}.{version['micro']}"
    return (
        f"the VM runs under TCG on QEMU {number}, whose migration can lose guest stores "
        "(fixed in QEMU 9.0): the migrated guest may crash or hold corrupt memory; "
        "KVM or QEMU 9.0+ migrates it safely"
    )


# QMP command that changes a running block job; for a mirror, its copy mode (QEMU 8.2+).
JOB_CHANGE_COMMAND = "block-job-change"


def can_switch_copy_mode(commands: list[dict[str, Any]]) -> bool:
    """Whether this QEMU (its `query-commands` answer) can make a running mirror
    write-blocking: the command exists only from 8.2, where it came with exactly that.

    Asked of QEMU rather than inferred from its version: distributions backport, and
    `query-commands` is a few KiB where `query-qmp-schema` is a few hundred.
    """
    return any(c.get("name") == JOB_CHANGE_COMMAND for c in commands)


async def vm_status(mon: Monitor) -> str:
    return (await mon.execute("query-status"))["status"]
