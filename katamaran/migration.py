"""QMP steps both sides share: capabilities, parameters, state checks."""

from __future__ import annotations

from .config import Config
from .qmp import Monitor

# Both sides get the same list: QEMU requires matching capabilities for some of them,
# and setting the source-only ones on the destination is harmless.
CAPABILITIES = ("events", "auto-converge", "pause-before-switchover")
ACTIVE_STATES = {"setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active"}
# 1 ms, not 0: with 0 QEMU switches over at the end of the first pass, before any sync.
OWN_SWITCHOVER_LIMIT_MS = 1
# bytes/s assumed for QEMU's own switchover test while katamaran decides (see
# Source._take_switchover_decision): with the 1 ms limit, a 1-byte threshold.
OWN_SWITCHOVER_BANDWIDTH = 1000
MAX_DOWNTIME_LIMIT_MS = 2_000_000  # QEMU's ceiling (MAX_MIGRATE_DOWNTIME): "switch over now"
UNCAPPED = 1 << 62  # bytes/s; QEMU's default cap (32 MiB/s) would dominate migration time


async def set_capabilities(mon: Monitor) -> None:
    caps = [{"capability": name, "state": True} for name in CAPABILITIES]
    await mon.execute("migrate-set-capabilities", {"capabilities": caps})


async def set_parameters(mon: Monitor, cfg: Config) -> None:
    await mon.execute(
        "migrate-set-parameters",
        {"downtime-limit": cfg.downtime_limit_ms, "max-bandwidth": UNCAPPED},
    )


async def tcg_dirty_tracking_is_reliable(mon: Monitor) -> bool:
    """Whether many RAM passes are safe: KVM, or QEMU 9.0+ under TCG.

    QEMU before 9.0 could lose pages a TCG vCPU dirtied during a bitmap sync (fixed
    upstream by "physmem: Fix migration dirty bitmap coherency with TCG memory
    access").  Seen here with QEMU 7.2: the more syncs, the likelier the destination
    guest finds its virtio rings corrupt ("virtio_blk: id 0 is not a head").
    """
    if (await mon.execute("query-kvm")).get("enabled"):
        return True
    version = (await mon.execute("query-version"))["qemu"]
    return (version["major"], version["minor"]) >= (9, 0)


async def vm_status(mon: Monitor) -> str:
    return (await mon.execute("query-status"))["status"]
