"""Source side: mirror the disk, pre-copy RAM, switch traffic into the tunnel, then pause.

Order that loses no disk write (the original tool cancelled the mirror after the
destination had resumed, so writes still in the mirror's dirty bitmap could be lost):

1. blockdev-mirror to the destination's NBD export, background copy (the guest's writes
   do not wait for the network while the bulk is copied).  Once READY, -copy-mode auto
   (the default) switches the job to write-blocking where QEMU can (block-job-change,
   8.2+): every guest write then completes on both disks, so the drain in step 3 finds
   nothing dirty and the VM's pause no longer grows with the guest's write rate.
   (-copy-mode write-blocking starts that way; background never switches.)
2. katamaran decides the switchover (QEMU's own downtime-limit drops to 1 ms, so QEMU
   pauses the VM by itself only when almost nothing is left): right after a dirty-bitmap
   sync that leaves no more RAM than fits in -downtime-limit at the measured bandwidth,
   katamaran diverts what the node sends to the VM's tap (see divert) and takes every
   frame already queued on the tap off it (see tapqueue), keeping them (tapqueue.Hold),
   then lets QEMU pause the VM (by lifting QEMU's downtime-limit).  On QEMU 8.2+ the
   switchover gate (see gate) keeps QEMU from pausing an idle VM itself before that:
   the divert and drain then happen at the end of the first pass, and the gate opens.
   The VM's packets stay kept while it is paused, and go into the tunnel, the kept ones
   first, once migrate-continue is sent: switched while the VM runs, the node's strict
   reverse-path filter would drop what it sends; switched before the commit, what the
   destination's plug holds would be lost if the migration were given up (kept, it is
   given back to the source VM).  Where that is unsafe (TCG on QEMU < 9.0) or there is
   no tap to drain, QEMU keeps -downtime-limit and katamaran only races it; if QEMU
   pauses first (nothing diverted yet), the tunnel is switched at STOP.
   `pause-before-switchover` holds QEMU in `pre-switchover` once the last RAM is sent.
3. block-job-cancel on the READY mirror = graceful completion: QEMU drains it and
   flushes the target; BLOCK_JOB_COMPLETED means the destination disk holds every
   write the guest completed.
4. migrate-continue: only now can the destination receive the final device state and
   resume. If anything fails before this point, migrate_cancel resumes the source.

The point of no return (see Phase): from migrate-continue on the source is never resumed
by katamaran and nothing is cancelled; with `return-path` QEMU reports `completed` only
once the destination has loaded the state.  A failure there leaves the VM where QEMU
left it and exits 3 (OutcomeUncertain): the operator decides which side runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import failpoint, migration, tapqueue
from .aio import within
from .config import Config, host_port
from .errors import KatamaranError, OutcomeUncertain, QMPCommandError
from .gate import SwitchoverGate, waits_at_gate
from .gate import remove_all as remove_gate_bitmaps
from .lock import VMLock, qemu_identity
from .names import divert_names
from .progress import Progress, mib
from .qmp import Event, Monitor, migration_status, named
from .streambuf import size_stream
from .tapqueue import TapQueues, TapQueueUnavailable
from .tls import TLSCreds

if TYPE_CHECKING:
    from .divert import TapDivert
    from .network import SourceTunnel

T = TypeVar("T")

JOB_PREFIX = "katamaran-mirror"
NBD_NODE = "katamaran-nbd"
NBD_FD = "katamaran-nbd"
MIGRATE_FD = "katamaran-migrate"
# bytes/s while the drain runs (see _ease_migration): about one page per 100 ms
# rate-limit window, after which QEMU's migration thread sleeps out the window.
DRAIN_MAX_BANDWIDTH = 4096
EASED_PARAMS = ("max-bandwidth", *migration.THROTTLE_PARAMS)  # what _ease_migration changes
# How long the VM's packets may be kept after the gate (see gate) while RAM converges;
# an idle guest converged at the next pass in the nested e2e, well within this.
GATE_HOLD_S = 2.0
# QEMU reads a new downtime-limit at its next 100 ms accounting window
# (migration_update_counters): two windows after katamaran takes its test back
# (_give_back_early), QEMU no longer pauses the VM at the one it had handed back.
TEST_TAKEN_BACK_S = 0.2
POLL_S = 0.1  # query-migrate period while RAM is copied (progress is shown once a second)


async def netlink(fn: Callable[..., T], *args: object) -> T:
    """network.netlink, imported on first use (see SourceMigration._prepare_tunnel)."""
    from .network import netlink as run

    return await run(fn, *args)


class Phase(enum.Enum):
    """Where the source is; the value is how error lines name it.

    Before COMMITTED any failure or signal cancels and the source VM runs again;
    from COMMITTED on (migrate-continue sent) nothing is cancelled or resumed.
    """

    PREPARE = "while preparing"
    MIRROR = "during the disk mirror"
    RAM = "during RAM copy"
    SWITCHOVER = "at the switchover (VM paused, mirror draining)"
    COMMITTED = "after migrate-continue"
    COMPLETED = "after the migration completed"
    HOLD = "during the tunnel hold"

    @property
    def committed(self) -> bool:
        return self in (Phase.COMMITTED, Phase.COMPLETED, Phase.HOLD)


# Run states a STOP may leave; only QEMU's own migration pause is the switchover.
SWITCHOVER_STATES = ("finish-migrate", "postmigrate")
STOP_CAUSES = {
    "io-error": "an I/O error",
    "paused": "a client's `stop` (an operator?)",
    "guest-panicked": "a guest kernel panic",
    "internal-error": "an internal error",
    "shutdown": "a guest shutdown",
    "watchdog": "the watchdog",
    "debug": "a debugger",
    "suspended": "a guest suspend",
}


@dataclass
class Summary:
    total_s: float
    downtime_ms: int | None
    ram_bytes: int
    storage_bytes: int

    def line(self) -> str:
        downtime = "n/a" if self.downtime_ms is None else f"{self.downtime_ms} ms"
        return (
            f"migration completed in {self.total_s:.2f} s "
            f"(downtime {downtime}, RAM {mib(self.ram_bytes)}, storage {mib(self.storage_bytes)})"
        )


def _link_exists(name: str) -> bool:
    """In this thread's network namespace (not /sys, which shows its mounter's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def connect_to(cfg: Config, port: int, what: str, timeout: float) -> socket.socket:
    """Open the stream here, in katamaran's network namespace, and hand it to QEMU.

    QEMU may live in a pod namespace whose ingress Kata redirects into the VM's tap
    (tcfilter); a socket made here keeps the migration streams out of that path.

    Handed over blocking, as QEMU's own `tcp:` sockets are (create_connection's timeout
    leaves it non-blocking): QEMU's migration thread writes the socket as it finds it,
    and on a non-blocking one the VM's pause grew by about 10 ms (STOP -> destination
    RESUME, QEMU 10.0, 512 MiB guest and disk: 23.6 ms against the bare sequence's
    11.0, median of 6 rounds; 11.8 against 11.3 with blocking sockets).
    """
    assert cfg.dest_ip is not None
    try:
        sock = socket.create_connection((str(cfg.dest_ip), port), timeout=timeout)
        sock.settimeout(None)
        return sock
    except OSError as err:
        raise KatamaranError(
            f"{what}: cannot connect to {host_port(cfg.dest_ip, port)}: {err.strerror or err}"
            " (is `katamaran -mode dest` running there?)"
        ) from None


class SourceMigration:
    def __init__(
        self, cfg: Config, mon: Monitor, progress: Progress, lock: VMLock | None = None
    ) -> None:
        self.cfg = cfg
        self.mon = mon
        self.progress = progress
        self.lock = lock  # held by the caller: what this run finds was left by a dead run
        self.phase = Phase.PREPARE
        self.saved: dict | None = None  # capabilities/parameters before this run
        self.pending_fds: set[str] = set()  # passed with getfd, not yet consumed by QEMU
        self.stopped_by: str | None = None  # a run state that paused the VM, not us
        self.deadline = 0.0
        self.hold_cut = asyncio.Event()
        self.nbd_sock: socket.socket | None = None
        self.job = f"{JOB_PREFIX}-{cfg.drive_id}"
        self.tunnel: SourceTunnel | None = None
        self.mirror_started = False
        self.nbd_added = False
        self.migration_started = False
        self.completed = False
        self.was_running = True
        self.storage_bytes = 0
        self.taps: TapQueues | None = None
        self.diverts: list[TapDivert] = []  # prepared; diverting once traffic is switched
        self.diverts_ready: asyncio.Future[None] | None = None
        self.switchover_started = False
        self.switched = False  # the paused VM's traffic goes into the tunnel (on_signal)
        self.kept_to_commit = False  # switch deferred to migrate-continue (_take_tap_now)
        self.cancel_asked = False  # a signal came once switched: the next one cancels
        self.draining = False  # katamaran's switchover is using the taps (see _watch_stop)
        self.drain_ended = asyncio.Event()
        self.stop_watch: asyncio.Future[None] | None = None  # see _watch_stop
        self.taking: asyncio.Future[None] | None = None  # the one take at STOP (_start_take)
        self.diverting: asyncio.Future[None] | None = None  # the take's divert, if late
        self.hold = tapqueue.Hold()  # the VM's packets until the switch (see there)
        self.last_sync: int | None = None
        self.passes = 0  # dirty syncs QEMU reported (MIGRATION_PASS)
        self.paused_at: float | None = None
        self.paused_ms: int | None = None
        self.saved_params: dict[str, int] = {}  # changed while katamaran decides and drains
        self.tls: TLSCreds | None = None
        self.gate: SwitchoverGate | None = None  # see gate
        self.no_gate = ""  # why there is none
        self.held_at: float | None = None  # loop time the gate's hold began (see _hold_at_gate)
        self.tcg_flaw: str | None = None  # see migration.tcg_dirty_tracking_flaw
        self.mirror_sync: asyncio.Future[None] | None = None  # -early-ram: the mirror's READY
        self.capped_at_gate = False  # -early-ram: bandwidth capped at the gate until READY
        self.storage_ready = False  # -early-ram: the background mirror sync reached READY
        self.mirror_blocking = False  # the mirror is write-blocking (see _hand_back_test)
        self.handed_back: dict[str, int] = {}  # QEMU's own test back (_hand_back_test)

    async def run(self) -> Summary:
        try:
            try:
                return await self._run()
            except KatamaranError as err:
                await self._regain_monitor()
                if self.phase is Phase.COMMITTED and not isinstance(err, OutcomeUncertain):
                    err = await self._uncertain(str(err))
                err.args = (f"{self.where}: {err}",)
                raise err from None
        finally:
            await self._cleanup()

    async def _run(self) -> Summary:
        await self._check_state()
        self.tcg_flaw = await migration.tcg_dirty_tracking_flaw(self.mon)
        if self.tcg_flaw:
            self.progress.warn(self.tcg_flaw)
        await self._save_settings()
        await migration.set_capabilities(self.mon)
        await migration.set_parameters(self.mon, self.cfg)
        if self.cfg.tls:
            self.tls = TLSCreds(self.mon, self.cfg)
            await self.tls.add()
        mirror = None
        await self._place_gate()
        if not self.cfg.shared_storage:
            self.phase = Phase.MIRROR
            mirror = await self._mirror()
        # Needed only from the switchover on: made while QEMU copies the disk.
        await self._prepare_tunnel()
        if mirror is not None and not (self.cfg.early_ram and self.gate):
            await self._synchronize_first(mirror)
            mirror = None
        self._watch_taps()
        # 0.5 s on a nested TCG node: made while QEMU copies RAM, awaited at the switch
        self.diverts_ready = asyncio.ensure_future(self._prepare_diverts())
        await self._take_switchover_decision()
        if mirror is not None:
            await self._start_early_ram(mirror)
        self.phase = Phase.RAM
        summary = await self._migrate()
        try:
            await self._drop_nbd_node()
        except KatamaranError as err:  # the VM has moved: a leftover node is no failure
            self.progress.warn(f"removing {NBD_NODE}: {err}")
        self.progress.step(summary.line())
        if self.tunnel and self.tunnel.ready:
            self.phase = Phase.HOLD
            self.progress.step(
                f"holding tunnel {self.tunnel.ifname} for {self.cfg.tunnel_hold:g} s "
                "(CNI convergence)"
            )
            try:
                await within(self.hold_cut.wait(), self.cfg.tunnel_hold)
            except asyncio.TimeoutError:  # the builtin only from 3.11
                pass
        return summary

    @property
    def where(self) -> str:
        """The phase as error lines name it.  The take at STOP comes before QEMU has
        confirmed its pause as the migration's (see _take_tap_now): until then the phase
        is still RAM, but a cancel there finds the VM paused, which "during RAM copy"
        would hide."""
        if self.phase is Phase.RAM and self.stopped_by is None:
            if self.switched:
                return "at the switchover (VM paused, its traffic in the tunnel)"
            if self.kept_to_commit:
                return "at the switchover (VM paused, its packets kept by katamaran)"
            if self.mirror_sync is not None and not self.storage_ready:
                return "during the disk mirror and RAM copy (-early-ram)"
        return self.phase.value

    def on_signal(self, name: str) -> bool:
        """Whether a SIGINT/SIGTERM/SIGHUP may cancel the run now (cli's handler asks).

        Before the point of no return, yes: cleanup cancels and the source runs.  After
        it, cancelling could only leave the VM nowhere or twice: keep waiting for the
        outcome (bounded by -migration-timeout / -qmp-timeout).  In the tunnel hold the
        migration is done: the hold is cut short and the run ends normally.

        In between, once the paused VM's traffic goes into the tunnel, the destination's
        plug holds packets that a cancel would drop with the destination's cleanup (the
        hold fault suite lost 13 of 1111 pings that way).  The migration is a few
        moments from done there (bounded by -switchover-timeout), so the first signal
        lets it finish; a second one cancels anyway, at the price of those packets.
        """
        if not self.phase.committed:
            if not self.switched or self.cancel_asked:
                return True
            self.cancel_asked = True
            self.progress.warn(
                f"{name}: the VM's traffic already goes to the destination, which holds it: "
                "finishing the migration (signal again to cancel anyway and lose those "
                "packets)"
            )
            return False
        if self.phase is Phase.HOLD:
            self.progress.warn(f"{name}: tunnel hold cut short; the migration has completed")
            self.hold_cut.set()
        else:
            self.progress.warn(
                f"{name} {self.phase.value}: not cancelling (the destination may already "
                "run the VM); waiting for the outcome"
            )
        return False

    async def _check_state(self) -> None:
        """Refuse a VM that is no source; recover what a killed katamaran left.

        The caller holds the per-VM lock, so a migration, block job or NBD node found
        here belongs to no running katamaran.  Not committed yet: cancelled (the VM runs
        again); committed or completed: refused, the operator decides.
        """
        status = await migration.vm_status(self.mon)
        if status == "inmigrate":
            raise KatamaranError(
                f"QEMU at {self.mon.path} is waiting for an incoming migration: "
                "it is a destination, not a source"
            )
        state = (await self.mon.execute("query-migrate")).get("status")
        earlier = self._journal()
        if status == "postmigrate" or state == "completed":
            done = []
            if earlier and await migration.restore(self.mon, earlier):
                done.append("restored the migration settings a killed katamaran had changed")
            if self.lock:
                self.lock.clear_state()
            done += await self._remove_stale_network()
            note = f" ({'; '.join(done)})" if done else ""
            raise KatamaranError(f"QEMU at {self.mon.path} has already migrated away{note}")
        if state in ("device", "postcopy-active"):
            raise OutcomeUncertain(
                f"QEMU at {self.mon.path} is finishing a migration an earlier katamaran "
                f"committed ({state}, VM {status}); not touching it: check the destination"
            )
        recovered: list[str] = []
        if state in migration.ACTIVE_STATES:
            mark = self.mon.mark()
            await self.mon.execute("migrate_cancel")
            await self._wait_migration_end(mark, self.mon.timeout)
            recovered.append(f"cancelled its migration ({state})")
        for job in await self.mon.execute("query-block-jobs"):
            if job["device"] == self.job:
                await self._cancel_job(force=True)
                recovered.append(f"cancelled block job {self.job}")
        # After the cancel: a killed run's gate bitmap is busy while its migration runs.
        for node in await remove_gate_bitmaps(self.mon):
            recovered.append(f"removed the switchover gate's bitmap from {node}")
        nodes = await self.mon.execute("query-named-block-nodes", {"flat": True})
        if any(node.get("node-name") == NBD_NODE for node in nodes):
            await self.mon.execute("blockdev-del", {"node-name": NBD_NODE})
            recovered.append(f"removed node {NBD_NODE}")
        for name in (NBD_FD, MIGRATE_FD):
            await self._closefd(name)
        if earlier:
            changed = await migration.restore(self.mon, earlier)
            if changed:
                recovered.append(f"restored {', '.join(changed)}")
        recovered += await self._remove_stale_diverts()
        status = await migration.vm_status(self.mon)
        if earlier and earlier.get("was_running") and status in ("paused", "finish-migrate"):
            await self.mon.execute("cont")
            status = await migration.vm_status(self.mon)
        if recovered:
            self.progress.warn(
                f"recovered what an earlier katamaran left on this VM: {'; '.join(recovered)}"
                f" (VM {status})"
            )
        if self.lock:
            self.lock.clear_state()
        self.was_running = status == "running"
        drives = {b["device"] for b in await self.mon.execute("query-block")}
        if not self.cfg.shared_storage and self.cfg.drive_id not in drives:
            raise KatamaranError(
                f"drive-mirror failed: no drive {self.cfg.drive_id!r} in this VM "
                f"(drives: {', '.join(sorted(d for d in drives if d)) or 'none'})"
            )

    async def _remove_stale_network(self) -> list[str]:
        """A run killed in the tunnel hold left its rule sending the VM's address into the
        tunnel, ahead of the CNI's routes: until removed, this node's traffic to the VM
        goes to a destination that no longer decapsulates it.  Removed on the refusal
        path of a migrated-away VM (the path such a re-run takes), with its divert."""
        removed = [f"removed {what}" for what in await self._remove_stale_diverts()]
        if self.cfg.dest_ip is None or self.cfg.vm_ip is None:
            return removed
        from pyroute2.netlink.exceptions import NetlinkError

        from .network import NetworkUnavailable, SourceTunnel

        try:
            tunnel = await netlink(SourceTunnel, self.cfg.dest_ip, self.cfg.vm_ip)
            try:
                stale = await netlink(tunnel.remove_stale)
            finally:
                await netlink(tunnel.close)
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(f"looking for a killed run's tunnel rule: {err}")
            return removed
        return removed + [f"removed {what}" for what in stale]

    async def _remove_stale_diverts(self) -> list[str]:
        """A killed run's divert keeps the VM's traffic from its tap: removed before the
        VM runs again.  Found by its veth's name (no pyroute2 unless one is there)."""
        pid, vm_ip = self.mon.peer_pid, self.cfg.vm_ip
        if pid is None or vm_ip is None or self.cfg.dest_ip is None:
            return []
        try:
            taps = sorted(set(tapqueue.tap_fds(pid).values()))
        except TapQueueUnavailable:
            return []
        stale = [t for t in taps if _link_exists(divert_names(vm_ip, t)[0])]
        if not stale:
            return []
        from .divert import TapDivert

        removed: list[str] = []
        for tap in stale:
            divert = await netlink(TapDivert, pid, tap, vm_ip)
            try:
                removed += await netlink(divert.remove_stale)
            finally:
                await netlink(divert.close)
        return removed

    def _journal(self) -> dict[str, Any] | None:
        """What a killed katamaran saved for this VM, if it was saved for this very QEMU.

        Why the check: the journal is named after the -qmp path, and a path outlives its
        QEMU (a sandbox re-created under the same id, a VM killed with its katamaran).
        A journal from another QEMU would put its settings on this one and `cont` a VM
        that its operator paused; it is dropped instead, with a warning.
        """
        earlier = self.lock.load_state() if self.lock else None
        if earlier is None or earlier.get("qemu") == qemu_identity(self.mon.peer_pid):
            return earlier
        self.progress.warn(
            f"ignored the settings a killed katamaran saved for another QEMU at "
            f"{self.mon.path} ({earlier.get('qemu') or 'unknown'}, now "
            f"{qemu_identity(self.mon.peer_pid) or 'unknown'})"
        )
        if self.lock:
            self.lock.clear_state()
        return None

    async def _save_settings(self) -> None:
        """Every capability/parameter this run may change, saved before the first change
        (also next to the lock, so a run after a SIGKILL can put them back), with the
        QEMU process it belongs to (see `_journal`)."""
        self.saved = await migration.snapshot(self.mon)
        if self.lock:
            ident = qemu_identity(self.mon.peer_pid)
            self.lock.save_state({**self.saved, "was_running": self.was_running, "qemu": ident})

    async def _closefd(self, name: str) -> None:
        try:
            await self.mon.execute("closefd", {"fdname": name})
        except QMPCommandError:
            pass  # consumed by the command it was passed for, or never passed
        self.pending_fds.discard(name)

    async def _prepare_tunnel(self) -> None:
        """Runs once the mirror has started: importing pyroute2 alone took 0.3-0.7 s here
        (2 busy cores), time the source used to spend before the mirror started.  The
        import runs on this thread, holding the event loop while QEMU copies the disk
        (events wait in the socket): not in a thread beside the QMP steps, which it
        slowed (GIL), nor beside anything else importing (import-lock races)."""
        assert self.cfg.dest_ip is not None and self.cfg.vm_ip is not None
        from pyroute2.netlink.exceptions import NetlinkError

        from .network import NetworkUnavailable, SourceTunnel

        try:
            self.tunnel = await netlink(SourceTunnel, self.cfg.dest_ip, self.cfg.vm_ip)
            for what in await netlink(self.tunnel.remove_stale):
                self.progress.warn(f"removed {what} left by an earlier run")
            await netlink(self.tunnel.prepare)
            for warning in self.tunnel.warnings:
                self.progress.warn(warning)
            self.progress.step(
                f"tunnel {self.tunnel.ifname} to {self.cfg.dest_ip} ready "
                f"(switched at the switchover for {self.cfg.vm_ip})"
            )
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(
                f"{err}; continuing without the tunnel: packets for {self.cfg.vm_ip} "
                "that arrive during the cutover will not reach the destination"
            )

    def _watch_taps(self) -> None:
        """Duplicate QEMU's tap fds so the switchover can wait for their queues to empty."""
        if not (self.tunnel and self.tunnel.ready):
            return  # without a tunnel nothing stops new frames reaching the tap anyway
        pid = self.mon.peer_pid
        try:
            if pid is None:
                raise TapQueueUnavailable("QEMU's pid is not visible from here")
            self.taps = TapQueues.of(pid)
        except TapQueueUnavailable as err:
            self.progress.warn(
                f"cannot watch the VM's tap queue ({err}); frames queued there at the "
                "switchover may be lost"
            )
            return
        if self.taps.fds:
            names = ", ".join(self.taps.names)
            self.progress.step(f"watching tap queue of {names} (QEMU pid {pid})")

    async def _take_switchover_decision(self) -> None:
        """Lower QEMU's own downtime-limit so the pause is katamaran's call (_converged).

        QEMU then pauses the VM by itself only when almost nothing is left.  Skipped
        where extra RAM passes are unsafe (see tcg_dirty_tracking_flaw): there
        katamaran only races QEMU's identical test.
        """
        early = self.cfg.early_ram and self.gate is not None and not self.cfg.shared_storage
        if not (self.taps and self.taps.fds) and not early:  # -early-ram needs the gate
            await self._remove_gate()  # nothing to take from the tap before the pause
            return  # nothing to drain: QEMU's own timing is as good
        if self.tcg_flaw:
            self.progress.step(
                "this QEMU's TCG dirty tracking is unreliable over many RAM passes (< 9.0): "
                "leaving the pause to QEMU; what the VM has not read from its tap by then "
                "follows through the tunnel"
            )
            return
        limit = {"downtime-limit": migration.OWN_SWITCHOVER_LIMIT_MS}
        params = await self.mon.execute("query-migrate-parameters")
        if migration.SWITCHOVER_BANDWIDTH in params:  # QEMU 8.2+
            # QEMU's threshold is bandwidth x limit: measured, 1 ms is still a few pages,
            # and in the nested e2e QEMU paused the VM itself, right after a sync, before
            # katamaran's next look in 3 of 4 runs.  At 1000 B/s it is 1 byte: QEMU then
            # switches over by itself only when not a single page is dirty.
            key = migration.SWITCHOVER_BANDWIDTH
            self.saved_params[key] = params[key]
            limit[key] = migration.OWN_SWITCHOVER_BANDWIDTH
        await self.mon.execute("migrate-set-parameters", limit)
        if migration.SWITCHOVER_BANDWIDTH in limit and self.cfg.vm_ip:
            await self._close_gate()

    async def _place_gate(self) -> None:
        """The gate's bitmap goes on the drive before the mirror starts (see
        SwitchoverGate.place); the gate is closed at the decision, where it applies."""
        if not self.cfg.vm_ip:
            return  # nothing can be diverted
        params = await self.mon.execute("query-migrate-parameters")
        if migration.SWITCHOVER_BANDWIDTH not in params:
            return  # QEMU < 8.2: no 1-byte threshold for the gate to hold
        if self.tcg_flaw:
            return  # the decision is left to QEMU there
        try:
            self.gate, self.no_gate = await SwitchoverGate.place(self.mon, self.cfg.drive_id)
        except QMPCommandError as err:
            self.no_gate = str(err)

    async def _close_gate(self) -> None:
        """Hold QEMU after its first pass until katamaran has taken the tap (see gate)."""
        if self.gate is not None:
            try:
                await self.gate.close()
                return
            except QMPCommandError as err:
                self.no_gate = str(err)
            await self._remove_gate()
        self.progress.step(
            f"no switchover gate ({self.no_gate}): if QEMU pauses an idle VM before "
            "katamaran diverts its tap, a frame QEMU reads as it pauses it is lost"
        )

    async def _remove_gate(self) -> None:
        if self.gate is not None:
            await self.gate.remove()
            self.gate = None

    def _release_taps(self) -> None:
        if self.taps:
            self.taps.close()
            self.taps = None

    async def _prepare_diverts(self) -> None:
        """Ready, for each watched tap, the divert of what still reaches it after the
        switch (see divert); a killed earlier run's divert is removed first."""
        if not (self.taps and self.taps.fds and self.tunnel and self.cfg.vm_ip):
            return
        from .divert import TapDivert
        from .network import NetworkUnavailable

        for tap in self.taps.names:
            divert = await netlink(TapDivert, self.taps.pid, tap, self.cfg.vm_ip)
            try:
                for what in await netlink(divert.remove_stale):
                    self.progress.warn(f"removed {what} left by an earlier run")
                await netlink(divert.prepare, self.hold)  # it keeps only -vm-ip's
            except Exception as err:  # noqa: BLE001 - the migration goes on without it
                await netlink(divert.close)
                if not isinstance(err, NetworkUnavailable):
                    err = NetworkUnavailable(f"cannot divert {tap}'s feed: {err}")
                self.progress.warn(
                    f"{err}; a frame that reaches {tap} just as the VM pauses may be lost"
                )
                continue
            self.diverts.append(divert)

    async def _diverts_prepared(self) -> None:
        """Wait for _prepare_diverts (started in the background) to have ended."""
        if self.diverts_ready is not None:
            ready, self.diverts_ready = self.diverts_ready, None
            try:
                await ready
            except Exception as err:  # noqa: BLE001 - the migration goes on without it
                self.progress.warn(f"preparing the taps' divert: {err}")

    async def _divert(self) -> None:
        """Right after the switch: nothing new reaches the taps (see divert)."""
        await self._diverts_prepared()
        for divert in self.diverts:
            if divert.installed:
                continue  # at the switchover already; this is the STOP handling
            try:
                await netlink(divert.divert)
            except Exception as err:  # noqa: BLE001 - the migration goes on without it
                self.progress.warn(
                    f"cannot divert {divert.tap}'s feed: {err}; a frame that reaches it "
                    "just as the VM pauses may be lost"
                )
                continue
            self.progress.step(
                f"{divert.tap}'s feed diverted to katamaran: frames still on their way to "
                "it follow the rest through the tunnel"
            )

    async def _undivert(self) -> None:
        """Give each tap its feed back (before the switch is undone: see divert) and say
        what was diverted."""
        await self._diverts_prepared()
        await self._diverted()
        diverts, self.diverts = self.diverts, []
        for divert in diverts:
            diverted = divert.installed
            try:
                await netlink(divert.remove)
            finally:
                await netlink(divert.close)
            if diverted:
                self._report_diverted(divert)

    def _report_diverted(self, divert: TapDivert) -> None:
        stats = divert.stats
        others = stats.other + stats.not_ip
        dropped = f" ({others} frame(s) not for {self.cfg.vm_ip} dropped)" if others else ""
        self.progress.step(
            f"{divert.tap}'s feed given back; {stats.forwarded} packet(s) for "
            f"{self.cfg.vm_ip} were diverted from it{dropped}"
        )
        if divert.settled is False:
            self.progress.warn(
                f"frames diverted from {divert.tap} were still on their way when its feed "
                "came back: the last ones may be lost"
            )
        if stats.unsendable or divert.error:
            error = f"; {divert.error}" if divert.error else ""
            self.progress.warn(
                f"{stats.unsendable} packet(s) for {self.cfg.vm_ip} diverted from "
                f"{divert.tap} could not be forwarded (GSO, larger than the tunnel MTU, or "
                f"malformed) and are lost{error}"
            )

    async def _mirror(self) -> tuple[int, bool]:
        """Start the mirror; returns the event mark and whether it can turn write-blocking."""
        sock = connect_to(self.cfg, self.cfg.nbd_port, "drive-mirror failed", self.mon.timeout)
        self.pending_fds.add(NBD_FD)
        # Kept (QEMU has its own copy): shutting it down is the one way to end NBD
        # requests stuck on a hung destination, which QEMU would otherwise wait out.
        self.nbd_sock = sock
        auto = self.cfg.copy_mode == "auto"
        switchable = auto and migration.can_switch_copy_mode(
            await self.mon.execute("query-commands")
        )
        await self.mon.send_socket(NBD_FD, sock)
        try:
            await self.mon.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": NBD_NODE,
                    "server": {"type": "fd", "str": NBD_FD},
                    "export": self.cfg.drive_id,
                    **(self.tls.nbd_client_options() if self.tls else {}),
                },
            )
            self.pending_fds.discard(NBD_FD)
            self.nbd_added = True
            mark = self.mon.mark()
            await self.mon.execute(
                "blockdev-mirror",
                {
                    "job-id": self.job,
                    "device": self.cfg.drive_id,
                    "target": NBD_NODE,
                    "sync": "full",
                    "copy-mode": "background" if auto else self.cfg.copy_mode,
                },
            )
        except KatamaranError as err:
            raise KatamaranError(f"drive-mirror failed: {err}") from None
        self.mirror_started = True
        self.mirror_blocking = self.cfg.copy_mode == "write-blocking"
        self.progress.step(f"mirroring {self.cfg.drive_id} to {self.cfg.dest_ip} over NBD")
        return mark, switchable

    async def _mirror_synchronized(self, mark: int, switchable: bool) -> None:
        await self._wait_mirror_ready(mark)
        if switchable:
            await self._make_write_blocking()
        elif self.cfg.copy_mode == "auto":
            self.progress.step(
                "mirror stays background (this QEMU cannot switch a running job; 8.2+ can): "
                "what the guest writes last is drained while the VM is paused"
            )

    async def _synchronize_first(self, mirror: tuple[int, bool]) -> None:
        """The mirror READY before `migrate` (the usual order); under -early-ram, where
        no gate could be closed, one line says why."""
        if self.cfg.early_ram:
            if self.tcg_flaw:
                why = "TCG before QEMU 9.0"
            elif not self.cfg.vm_ip:
                why = "no -vm-ip"
            else:
                why = self.no_gate or "QEMU < 8.2 (no avail-switchover-bandwidth)"
            self.progress.step(f"-early-ram: no switchover gate ({why})")
        await self._mirror_synchronized(*mirror)

    async def _start_early_ram(self, mirror: tuple[int, bool]) -> None:
        """-early-ram: the mirror goes on synchronizing in the background and `migrate`
        starts now, its RAM pass overlapping the disk copy, where the gate can hold QEMU
        after that pass until the mirror is READY (see gate; the RAM loop keeps it closed
        meanwhile).  Without a closed gate QEMU could pause the VM before READY and wait
        with it paused for the disk: the disk is synchronized first, as without the flag.
        """
        if self.gate is None:  # the decision could not close it (no_gate says why)
            await self._synchronize_first(mirror)
            return

        async def synchronize() -> None:
            await self._mirror_synchronized(*mirror)
            self.storage_ready = True

        self.mirror_sync = asyncio.ensure_future(synchronize())
        self.progress.step("-early-ram: RAM copied while the disk is mirrored")

    def _storage_in_sync(self) -> bool:
        """Whether the mirror is READY (or there is none): before that the gate stays
        closed and no switchover is taken.  A failed background sync raises here."""
        if self.mirror_sync is None:
            return True
        if not self.mirror_sync.done():
            return False
        self.mirror_sync.result()  # its KatamaranError ends the RAM loop
        return True

    async def _cap_at_gate(self) -> None:
        """QEMU sent its first pass before the disk is READY and spins at the gate (see
        gate): cap its bandwidth until then; _hold_at_gate lifts the cap."""
        if self.capped_at_gate:
            return
        params = await self.mon.execute("query-migrate-parameters")
        self.saved_params.setdefault("max-bandwidth", params["max-bandwidth"])
        await self.mon.execute("migrate-set-parameters", {"max-bandwidth": DRAIN_MAX_BANDWIDTH})
        self.capped_at_gate = True
        self.progress.step("first RAM pass sent before the disk: held at the switchover gate")

    async def _make_write_blocking(self) -> None:
        """-copy-mode auto, at READY: from now on each guest write completes on both disks.

        The background copy leaves the guest's latest writes dirty until its next pass;
        QEMU drains them at the switchover (block-job-cancel), with the VM paused.  Not
        before READY: during the bulk copy write-blocking would make every guest write
        wait for the network for no gain.  A refusal is no failure: background is safe,
        only its drain is longer.
        """
        change = {"id": self.job, "type": "mirror", "copy-mode": "write-blocking"}
        try:
            await self.mon.execute(migration.JOB_CHANGE_COMMAND, change)
        except QMPCommandError as err:
            self.progress.warn(f"mirror stays background: {migration.JOB_CHANGE_COMMAND}: {err}")
            return
        self.mirror_blocking = True
        self.progress.step("mirror switched to write-blocking: guest writes now reach both disks")

    async def _wait_mirror_ready(self, mark: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.storage_sync_timeout
        done = named(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR"), device=self.job)
        while True:
            found = await self.mon.next_event(done, mark, min(1.0, deadline - loop.time()))
            if found:
                mark, event = found
                if event["event"] == "BLOCK_JOB_READY":
                    self.storage_bytes = event["data"].get("len", 0)
                    self.progress.step(f"storage synchronized ({mib(self.storage_bytes)})")
                    return
                if event["event"] == "BLOCK_JOB_ERROR" or event["data"].get("error"):
                    raise KatamaranError(
                        f"drive-mirror failed: {event['data'].get('error', 'I/O error')}"
                    )
                raise KatamaranError("drive-mirror failed: job ended before synchronizing")
            if loop.time() >= deadline:
                raise KatamaranError(
                    f"storage sync for job {self.job} did not complete within "
                    f"{self.cfg.storage_sync_timeout:g}s (guest write rate too high? "
                    "raise -storage-sync-timeout)"
                )
            for job in await self.mon.execute("query-block-jobs"):
                if job["device"] == self.job and job["len"]:
                    pct = 100.0 * job["offset"] / job["len"]
                    self.progress.update(
                        f"storage {pct:5.1f}% ({mib(job['offset'])} of {mib(job['len'])})"
                    )

    async def _migrate(self) -> Summary:
        what = "QEMU reported migration failed"
        sock = connect_to(self.cfg, self.cfg.migration_port, what, self.mon.timeout)
        self.pending_fds.add(MIGRATE_FD)
        try:
            # what QEMU can have queued here at the pause (see streambuf)
            if sized := size_stream(sock, self.cfg.stream_buffer, socket.SO_SNDBUF):
                self.progress.step(sized)
            await self.mon.send_socket(MIGRATE_FD, sock)
        finally:
            sock.close()
        mark = self.mon.mark()
        self.stop_watch = asyncio.ensure_future(self._watch_stop(mark))
        self.migration_started = True  # from here cleanup asks QEMU, even if `migrate` failed
        await self.mon.execute("migrate", {"uri": f"fd:{MIGRATE_FD}"})
        self.pending_fds.discard(MIGRATE_FD)
        self.progress.step(
            f"migrating RAM to {host_port(self.cfg.dest_ip, self.cfg.migration_port)}"
        )
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.cfg.migration_timeout
        next_show = loop.time() + 1.0
        # MIGRATION_PASS: a dirty sync just ended.  The convergence test runs at once, not
        # at the next poll: an idle guest's next sync may find nothing dirty, and QEMU
        # then pauses the VM itself, before katamaran switched; a frame on the tap at
        # that moment is parked and lost (fresh-clone CI, 2026-11-30: 3 cases of 4,
        # QEMU paused 0.08-0.5 s after katamaran's last 100 ms poll).
        interesting = named(("STOP", "MIGRATION", "MIGRATION_PASS", "BLOCK_JOB_ERROR"))
        while True:
            wait = min(POLL_S, self.deadline - loop.time())
            found = await self.mon.next_event(interesting, mark, wait)
            if found:
                mark, event = found
                if event["event"] != "MIGRATION_PASS":
                    if await self._on_event(event):
                        break
                    continue
                self._count_pass(event)
                if self.switchover_started or self.phase is Phase.COMMITTED:
                    continue
            if loop.time() >= self.deadline:
                if self.phase is Phase.COMMITTED:
                    raise await self._uncertain("no outcome within the migration timeout")
                raise KatamaranError(
                    f"migration did not complete within {self.cfg.migration_timeout:g}s "
                    "(dirty page churn? raise -migration-timeout)"
                )
            if self.phase is Phase.COMMITTED:
                # QEMU sends the last RAM and the device state holding its big lock, so
                # QMP commands may wait for a slow destination; events still come.
                continue
            info = await self._ask("query-migrate")
            if info is None:
                continue  # the STOP that came meanwhile is handled first
            in_sync = self._storage_in_sync()
            if not in_sync:  # -early-ram: the storage has its own timeout until READY
                self.deadline = loop.time() + self.cfg.migration_timeout
            if self.gate and not self.gate.opened and waits_at_gate(info):
                if in_sync:
                    await self._hold_at_gate(info, mark)
                else:
                    await self._cap_at_gate()
                continue
            if (
                self.held_at is not None
                and not self.switchover_started
                and loop.time() - self.held_at > GATE_HOLD_S
                and not await self._give_back_early()
            ):
                continue  # the VM paused or is pausing: the STOP is read next
            if loop.time() >= next_show:
                self._show_ram(info)
                next_show = loop.time() + 1.0
            if not self.switchover_started and in_sync and await self._converged(info):
                await self._switchover(info, mark)
        info = await self.mon.execute("query-migrate")
        ram = info.get("ram", {})
        downtimes = [d for d in (info.get("downtime"), self.paused_ms) if d is not None]
        return Summary(
            total_s=self.progress.elapsed(),
            downtime_ms=max(downtimes) if downtimes else None,
            ram_bytes=ram.get("transferred", 0),
            storage_bytes=self.storage_bytes,
        )

    async def _ask(self, command: str, args: dict | None = None) -> Any:
        """A QMP command of the RAM loop; None when a running mirror holds QEMU too long.

        QEMU pauses the VM from its migration thread and then drains every disk holding
        its big lock: a command in flight at that moment (the poll, the mirror's
        progress, the lifted limit) waits behind mirror writes stuck on a hung
        destination, as long as TCP does.  Past -switchover-timeout it is dropped
        (qemu.qmp discards a late answer) and the loop reads the STOP, whose check then
        cuts the NBD connection (_check_stop).  Regression: only the poll was bounded; a
        query-block-jobs sent just before the pause waited the 30 s QMP timeout, and the
        cleanup's own commands as long again (1 run in 3 of the stuck-drain fault test).
        """
        if not self.mirror_started:
            return await self.mon.execute(command, args)
        try:
            return await within(self.mon.execute(command, args), self.cfg.switchover_timeout)
        except asyncio.TimeoutError:  # the builtin only from 3.11
            return None

    async def _on_event(self, event: Event) -> bool:
        """React to one event; True once the migration has completed."""
        name, data = event["event"], event.get("data", {})
        if name == "STOP":
            if self.paused_at is None:
                self.paused_at = asyncio.get_running_loop().time()
            if self.passes >= 2:  # may be QEMU's own switchover: act before asking
                await self._start_take()
                await self._check_stop()
            else:  # in the first pass QEMU cannot switch over: an operator, an I/O error
                await self._check_stop()
                await self._start_take()
            return False
        if name == "BLOCK_JOB_ERROR" and data.get("device") == self.job:
            raise KatamaranError(f"drive-mirror failed: {data.get('reason', 'I/O error')}")
        if name != "MIGRATION":
            return False
        status = data.get("status")
        if status == "pre-switchover":
            self.phase = Phase.SWITCHOVER
            await self._finish_mirror()
            await self._commit()
        elif status == "completed":
            self.completed = True
            self.phase = Phase.COMPLETED
            if self.paused_at is not None:
                elapsed = asyncio.get_running_loop().time() - self.paused_at
                self.paused_ms = round(elapsed * 1000)
            return True
        elif status in ("failed", "cancelled"):
            info = await self.mon.execute("query-migrate")
            reason = info.get("error-desc", status)
            if self.phase is Phase.COMMITTED:
                raise await self._uncertain(f"QEMU reported migration failed: {reason}")
            raise KatamaranError(f"QEMU reported migration failed: {reason}")
        return False

    async def _watch_stop(self, mark: int) -> None:
        """Take the tap (see _take_tap_now) the moment QEMU pauses the VM, even while
        the RAM loop waits for an answer (or, in katamaran's own switchover, as soon as
        its drain has let go of the taps).

        Why a task of its own: the loop asks QEMU after every dirty sync, and the sync
        that finds nothing left is the one QEMU pauses the VM after, so its question is
        usually in flight at the STOP, and QEMU answers it only at `pre-switchover`:
        the loop reads the STOP too late.  Found by the held-drain test
        (test_qemu_reads_no_tap_frame_between_stop_and_pre_switchover): the STOP
        waited out the whole -switchover-timeout behind a `query-migrate`.
        """
        loop = asyncio.get_running_loop()
        match = named(("STOP", "MIGRATION_PASS"))
        while True:
            found = await self.mon.next_event(match, mark, 3600.0)
            if found is None:
                continue
            mark, event = found
            if event["event"] == "MIGRATION_PASS":
                self._count_pass(event)
                continue
            if self.passes < 2:
                return  # not the migration's: the loop asks QEMU first
            self.paused_at = loop.time()
            if self.draining:
                await self.drain_ended.wait()
            self._start_take()
            return

    def _count_pass(self, event: Event) -> None:
        """MIGRATION_PASS, seen by the loop and the STOP watch alike (either may be first)."""
        self.passes = max(self.passes, event.get("data", {}).get("pass", 0))

    def _start_take(self) -> asyncio.Future[None]:
        """The one take of the tap at STOP, begun by whichever of the STOP watch and the
        loop comes first; the other waits for it.  Claimed at once, not when the task
        starts: the loop must not begin its own switchover in between."""
        if self.taking is None:
            self.switchover_started = True  # QEMU may stop the VM itself (an idle guest)
            self.taking = asyncio.ensure_future(self._take_tap_now())
        return self.taking

    async def _end_stop_watch(self) -> None:
        """Stop waiting for a STOP; let a take that began run to its end (a thread reads
        the taps: they must not be closed under it)."""
        watch, self.stop_watch = self.stop_watch, None
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        if self.taking is not None:
            await asyncio.gather(self.taking, return_exceptions=True)
        await self._diverted()

    async def _diverted(self) -> None:
        """Wait for a divert begun at STOP (see _take_tap_now) to have ended."""
        if self.diverting is not None:
            diverting, self.diverting = self.diverting, None
            await asyncio.gather(diverting, return_exceptions=True)

    async def _take_tap_now(self) -> None:
        """At STOP, before asking QEMU anything: take what waits on the taps; where
        katamaran's switchover diverted their feed, keep it all until migrate-continue
        (see _keeps_to_commit); else switch traffic into the tunnel now (what was kept
        while the VM ran goes first, see tapqueue.Hold), send what waits on the taps,
        divert their feed and send on what reached them meanwhile.

        Why before: QEMU holds its big lock from the STOP until `pre-switchover` (it
        drains and flushes the disks), so its main loop cannot read the tap meanwhile.
        Once it runs again, the paused VM's NIC can take no frame, and QEMU parks the
        first one it reads in its own queue, where it dies with the source.  The
        answer to `query-status` (_check_stop) comes only after that release: asked
        first, it left the tap to QEMU for the whole drain (in the nested e2e, QEMU
        paused an idle VM itself before katamaran's switchover, and a ping was lost).
        A frame read while QEMU stops the vCPUs, before the STOP event, is still
        parked: only katamaran's own switchover (divert before the pause) avoids that.
        """
        if self.tunnel and self.tunnel.ready and self._keeps_to_commit():
            self.kept_to_commit = True
            await self._forward_tap_leftovers()  # first (see above); into the hold too
            self.progress.step(
                f"VM paused: packets for {self.cfg.vm_ip} kept until migrate-continue "
                f"({self.hold.held} so far), then sent into {self.tunnel.ifname}"
            )
            failpoint.hit("paused", self.progress.step)
        elif self.tunnel and self.tunnel.ready:
            await self._switch("VM paused: ", "it ran")
            # What waits on the tap first: the divert takes ~0.1 s on a nested node, and
            # QEMU may run again sooner.
            await self._forward_tap_leftovers()
            if self.diverts_ready or any(not d.installed for d in self.diverts):
                # QEMU paused the VM before katamaran's switchover: divert now, then send
                # on what came meanwhile.  Not awaited: the pause need not wait for it
                # (a frame QEMU reads meanwhile is parked either way).
                self.diverting = asyncio.ensure_future(self._divert_and_take())
                return
        else:
            self.progress.step("VM paused")
        self._release_taps()

    def _keeps_to_commit(self) -> bool:
        """Whether the VM's packets can stay with katamaran until migrate-continue: its
        switchover diverted every tap's feed before the pause, and keeps what comes.

        Why wait for the commit: what goes into the tunnel waits in the destination's
        plug, and if the migration is given up before the commit (a signal, a failed
        drain, a destination that ends) the destination drops it (the hold fault suite
        lost 11-52 pings so).  Kept here, it is given back to the source VM instead
        (the gate cases: all kept packets back, none lost).  The VM is paused either
        way, and migrate-continue comes tens of milliseconds after the STOP; the
        destination runs the VM only after the device state, which follows it.
        Without the divert, the node's route feeds the paused VM's tap, where QEMU
        parks a frame and loses it with the source: there the switch stays at STOP.
        """
        return (
            bool(self.diverts)
            and self.diverts_ready is None
            and all(d.installed for d in self.diverts)
            and not self.hold.released
            and self.tunnel is not None
            and not self.tunnel.switched
        )

    async def _switch(self, prefix: str, since: str) -> None:
        """Traffic for the VM into the tunnel, what was kept (since `since`) first."""
        assert self.tunnel is not None
        await netlink(self.tunnel.switch)
        self.switched = True
        held, sent = await self._release_hold(self.tunnel.ifname)
        first = f"; the {sent} packet(s) kept while {since} went first" if sent else ""
        self.progress.step(
            f"{prefix}traffic for {self.cfg.vm_ip} now goes through {self.tunnel.ifname}{first}"
        )
        failpoint.hit("switched", self.progress.step)
        if held > sent:
            self.progress.warn(
                f"{held - sent} packet(s) kept for {self.tunnel.ifname} could not be sent "
                "(larger than the tunnel MTU) and are lost"
            )

    async def _switch_kept(self) -> None:
        """After migrate-continue: the deferred switch (see _keeps_to_commit).  A failure
        here loses the kept packets but not the migration, which goes on regardless:
        said, not raised."""
        try:
            await self._switch("migrate-continue sent: ", "the VM was paused")
        except Exception as err:  # noqa: BLE001 - the migration is committed
            self.progress.warn(
                f"cannot switch traffic for {self.cfg.vm_ip} into the tunnel: {err}; it "
                "reaches the destination only once the CNI route has moved"
            )

    async def _divert_and_take(self) -> None:
        try:
            await self._divert()
            await self._forward_tap_leftovers()
        finally:
            self._release_taps()

    async def _check_stop(self) -> None:
        """A STOP is the switchover only if QEMU's migration paused the VM.

        QEMU drains every disk while it pauses the VM, holding its main loop: a mirror
        write stuck on a hung destination holds QEMU (and the paused VM) as long as TCP
        does.  If QEMU does not answer within -switchover-timeout, katamaran cuts its
        NBD connection: the stuck writes fail, QEMU fails the migration, the source runs.
        """
        try:
            status = await within(migration.vm_status(self.mon), self.cfg.switchover_timeout)
        except asyncio.TimeoutError:  # the builtin only from 3.11
            self.phase = Phase.SWITCHOVER
            self._cut_nbd()
            raise KatamaranError(
                f"QEMU did not answer within {self.cfg.switchover_timeout:g}s of pausing the "
                "VM (-switchover-timeout): its last disk writes to the destination are stuck; "
                "NBD connection cut so that the migration fails and the source runs again"
            ) from None
        if status in SWITCHOVER_STATES:
            self.phase = Phase.SWITCHOVER
            return
        self.stopped_by = status
        cause = STOP_CAUSES.get(status, "something else")
        raise KatamaranError(f"VM paused by {cause} ({status}), not by the migration")

    async def _commit(self) -> None:
        """The point of no return: from here the source VM is never resumed by katamaran.

        The phase changes before the command is sent: if its answer is lost (timeout,
        signal), QEMU may have acted on it, and resuming then could run the VM twice.
        """
        self.phase = Phase.COMMITTED
        loop = asyncio.get_running_loop()
        # The outcome gets at least one -qmp-timeout, whatever was left of the budget.
        self.deadline = max(self.deadline, loop.time() + self.mon.timeout)
        self.progress.step("migrate-continue: point of no return (the source will not resume)")
        await self.mon.execute("migrate-continue", {"state": "pre-switchover"})
        if self.kept_to_commit:
            await self._switch_kept()

    async def _uncertain(self, reason: str) -> OutcomeUncertain:
        """After the commit, say where the VM is as far as the source can tell; exit 3."""
        try:
            mark = self.mon.mark()
            status = await migration.vm_status(self.mon)
            state = (await self.mon.execute("query-migrate")).get("status")
            if status == "finish-migrate" and state in ("failed", "cancelled"):
                # QEMU sets the migration's state before it settles the VM (it resumes
                # one that was running, else leaves it in postmigrate): wait for that.
                with contextlib.suppress(TimeoutError):
                    await self.mon.wait_event(named("RESUME"), self.mon.timeout, mark)
                status = await migration.vm_status(self.mon)
        except KatamaranError:
            return OutcomeUncertain(
                f"{reason}; the source QEMU no longer answers: the VM may be running on "
                "the destination: check it before restarting anything"
            )
        if status == "running":
            where = (
                "QEMU resumed the VM on the source itself after the failure (migration "
                f"{state}): make sure the destination is not running it"
            )
        else:
            where = (
                f"the VM is paused on the source ({status}, migration {state}) and may be "
                "running on the destination: left as is; check the destination, then "
                "`cont` exactly one side"
            )
        return OutcomeUncertain(f"{reason}; {where}")

    async def _finish_mirror(self) -> None:
        """Drain the READY mirror while the VM is paused (see module docstring)."""
        if not self.mirror_started:
            return
        mark = self.mon.mark()
        await self.mon.execute("block-job-cancel", {"device": self.job})
        ended = named(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), device=self.job)
        try:
            # The VM is paused: this wait is downtime, so it has its own short bound.
            event = await self.mon.wait_event(ended, self.cfg.switchover_timeout, mark)
        except TimeoutError:
            self._cut_nbd()  # so the stuck drain ends now and the cancel can resume the VM
            raise KatamaranError(
                f"the paused mirror drain of job {self.job} did not finish within "
                f"{self.cfg.switchover_timeout:g}s (-switchover-timeout); cancelling the "
                "migration so the source runs again"
            ) from None
        self.mirror_started = False
        if event["event"] != "BLOCK_JOB_COMPLETED" or event["data"].get("error"):
            raise KatamaranError(
                f"drive-mirror failed at switchover: {event['data'].get('error', event['event'])}"
            )
        self.storage_bytes = max(self.storage_bytes, event["data"].get("offset", 0))

    async def _converged(self, info: dict) -> bool:
        """True right after a dirty sync (not the first pass) that left no more RAM, plus
        what the mirror has not copied yet (drained while the VM is paused), than
        -downtime-limit allows at the bandwidth QEMU measured: QEMU's own test, which
        katamaran now applies itself so it can switch traffic before the VM pauses."""
        ram = info.get("ram") or {}
        if info.get("status") != "active" or "dirty-sync-count" not in ram:
            return False
        sync, last = ram["dirty-sync-count"], self.last_sync
        self.last_sync = sync
        if sync < 2 or sync == last:
            return False
        bytes_per_ms = ram.get("mbps", 0.0) * 1e6 / 8 / 1000
        budget = bytes_per_ms * self.cfg.downtime_limit_ms
        if bytes_per_ms <= 0 or ram["remaining"] > budget:
            return False  # no need to ask about the mirror
        unsynced = await self._mirror_unsynced()
        return unsynced is not None and ram["remaining"] + unsynced <= budget

    async def _mirror_unsynced(self) -> int | None:
        """Bytes the READY mirror still has to copy (len - offset), 0 without a mirror;
        None if QEMU did not say in time (see _ask)."""
        if not self.mirror_started:
            return 0
        jobs = await self._ask("query-block-jobs")
        if jobs is None:
            return None
        for job in jobs:
            if job["device"] == self.job:
                return max(0, job["len"] - job["offset"])
        return 0

    async def _switchover(self, info: dict, mark: int) -> None:
        """Divert the tap's feed and take its queue, the VM still running (the packets are
        kept, see tapqueue.Hold), then let QEMU pause it; traffic is switched once
        migrate-continue is sent (see _keeps_to_commit).

        `mark` is the main loop's place in the event history: a STOP after it means QEMU
        paused the VM by itself meanwhile (nothing left to copy), which ends the drain.
        """
        if self.switchover_started:
            return  # QEMU paused the VM while the test asked it: the STOP watch has it
        self.switchover_started = True
        if self.held_at is not None:  # the tap's feed and queue were taken at the gate
            remaining = mib(info["ram"]["remaining"])
            self.progress.step(f"switchover ({remaining} of RAM left): pausing the VM")
            await self._lift_switchover_limit()
            return
        if not await self._take_feed(info, mark, "switchover"):
            await self._lift_switchover_limit()

    async def _hold_at_gate(self, info: dict, mark: int) -> None:
        """QEMU has sent the first pass and waits at the gate (see gate): take the tap's
        feed and queue, the VM running (its packets are kept until the pause), then let
        QEMU go on at full bandwidth.  The cap _take_feed sets first also ends QEMU's
        spinning at the gate."""
        assert self.gate is not None
        what = "first RAM pass sent, QEMU held at the switchover gate"
        if await self._take_feed(info, mark, what):
            return  # paused by something else (QEMU cannot pass the gate): the STOP check
        failpoint.hit("gate-held", self.progress.step)
        saved = self.saved_params
        back = {key: saved.pop(key) for key in EASED_PARAMS if key in saved}
        opened = {**back, **self._hand_back_test()}
        await self.mon.execute("migrate-set-parameters", opened)
        self.gate.opened = True
        self.held_at = asyncio.get_running_loop().time()

    def _hand_back_test(self) -> dict[str, int]:
        """The parameters that open the gate: QEMU's own switchover test again where it
        is katamaran's, else only the dirty syncs (see gate).

        Why: QEMU reads a new downtime-limit only at its next 100 ms accounting window
        (migration_update_counters), so the lift after katamaran's own test passed left
        the VM running, its packets held, up to 100 ms longer (117 ms in the 1 ms e2e of
        2026-12-04).  With the tap's feed diverted and drained nothing can reach the tap,
        so QEMU may pause the VM at its own test, RAM left <= bandwidth x
        -downtime-limit, which is katamaran's but for the mirror's unsynced bytes: handed
        back only where there is no mirror or it is write-blocking (what it has not
        copied is the writes in flight), so the paused drain stays bounded.
        """
        assert self.gate is not None
        key = migration.SWITCHOVER_BANDWIDTH
        if (self.mirror_started and not self.mirror_blocking) or key not in self.saved_params:
            return {"downtime-limit": self.gate.open_limit()}
        self.handed_back = {key: self.saved_params.pop(key)}
        return {"downtime-limit": self.cfg.downtime_limit_ms, **self.handed_back}

    async def _take_test_back(self) -> bool:
        """Undo _hand_back_test before the VM gets its feed back: QEMU must not pause it
        by itself while frames reach the tap again (the gate's state after opening).

        False when QEMU may be pausing the VM: it did not answer within
        -switchover-timeout (QEMU drains the disks holding its big lock, see _ask), or a
        STOP came within two of its accounting windows (TEST_TAKEN_BACK_S), after which
        it no longer applies the handed-back test; then the feed stays diverted and the
        pause is the switchover.  STOP is read in QEMU's own order: one sent before
        QEMU answers `query-status` is in the history before that answer.
        """
        if self.gate is None or not self.handed_back:
            return True
        self.saved_params.update(self.handed_back)  # restored on exit whatever QEMU holds
        mark = self.mon.mark()
        key = migration.SWITCHOVER_BANDWIDTH
        own = {"downtime-limit": self.gate.open_limit(), key: migration.OWN_SWITCHOVER_BANDWIDTH}
        if await self._ask("migrate-set-parameters", own) is None:
            return False  # not known to be taken back: the next give-back sends it again
        self.handed_back = {}
        await asyncio.sleep(TEST_TAKEN_BACK_S)
        status = await self._ask("query-status")
        stopped = await self.mon.next_event(named(("STOP",)), mark, 0)
        return status is not None and status.get("status") == "running" and stopped is None

    async def _give_back_early(self) -> bool:
        """RAM has not converged GATE_HOLD_S after the gate: the VM gets its feed and the
        kept packets back and runs on until katamaran's switchover takes them again
        (where QEMU may pause an idle VM first, see gate).

        Why the gate stays open meanwhile: QEMU runs the dirty sync only when its
        estimate is under the same threshold that lets it pause (migration_iteration_run:
        `pending < threshold` → exact sync → `pending < threshold` → pause), and at the
        end of a pass the estimate is the gate's bitmap alone.  A gate closed again would
        stop the syncs, and with them the RAM copy and the convergence test katamaran
        reads (_converged): the migration would only wait out -migration-timeout.  Open,
        QEMU pauses by itself only at a sync that finds not one dirty page, which a guest
        that has kept RAM from converging for GATE_HOLD_S rarely gives.
        False when nothing was given back (the VM paused, or may be pausing)."""
        if self.paused_at is not None:
            return False  # QEMU paused the VM at its own test: the take at STOP has it
        async with self._using_taps():  # a STOP meanwhile is taken once this is done
            if not await self._take_test_back():
                return False  # QEMU may be pausing the VM: its feed stays diverted
            for divert in self.diverts:
                await netlink(divert.undivert)
            _, sent = await self._release_hold("the VM")
            self.hold.keep()
            self.held_at = None
        self.progress.step(
            f"RAM not converged {GATE_HOLD_S:g} s after the gate: the VM's feed and "
            f"{sent} kept packet(s) given back until the switchover"
        )
        return True

    async def _take_feed(self, info: dict, mark: int, what: str) -> bool:
        """Divert and drain the taps (see _divert_and_drain) with the STOP watch told
        (see _watch_stop); True when the VM was paused meanwhile."""
        async with self._using_taps():
            return await self._divert_and_drain(info, mark, what)

    @contextlib.asynccontextmanager
    async def _using_taps(self) -> AsyncIterator[None]:
        """katamaran's own work on the taps and their feed: a STOP that comes meanwhile
        waits for it to end (see _watch_stop); the take at STOP would race it."""
        self.draining = bool(self.taps and self.taps.fds)
        self.drain_ended.clear()
        try:
            yield
        finally:
            self.draining = False  # from here a STOP is the watch's to handle at once
            self.drain_ended.set()

    async def _divert_and_drain(self, info: dict, mark: int, what: str) -> bool:
        """_take_feed's work; True when QEMU paused the VM meanwhile."""
        draining, remaining = self.draining, mib(info["ram"]["remaining"])
        tunnel = self.tunnel if self.tunnel and self.tunnel.ready else None
        if draining:  # first: the divert takes ~0.1 s on a nested TCG node
            await self._ease_migration(info.get("cpu-throttle-percentage") or 0)
        if tunnel and draining:
            # The switch waits for the pause (see tapqueue.Hold): the VM's packets are
            # kept meanwhile, its own go out as before.
            await self._divert()
            self.progress.step(
                f"{what} ({remaining} of RAM left): packets for {self.cfg.vm_ip} kept "
                f"while the VM runs; they go into {tunnel.ifname} after migrate-continue"
            )
        elif tunnel:  # no tap to take frames from: nothing to keep them from
            await netlink(tunnel.switch)
            self.progress.step(
                f"{what} ({remaining} of RAM left): traffic for {self.cfg.vm_ip} "
                f"into {tunnel.ifname}"
            )
        else:
            self.progress.step(f"{what} ({remaining} of RAM left): pausing the VM")
        if not (tunnel and draining):
            self.hold.release()  # nothing is kept: sent as it comes (nothing held yet)
        if draining and await self._drain_taps(mark):
            return True  # QEMU is pausing the VM already: the STOP handling comes next
        if not tunnel:
            self._release_taps()
        return False

    async def _drain_taps(self, mark: int) -> bool:
        """Take what is queued on the VM's taps off them, the VM still running, and keep
        it for the tunnel (at most -tap-drain-timeout; see tapqueue for why the VM is not
        left to read it).

        Returns True when QEMU paused the VM first.  An idle guest has no dirty page
        left, and QEMU then switches over by itself whatever downtime-limit says; its
        STOP ends the drain at once, and the STOP handling reads what is left.
        """
        assert self.taps is not None
        timeout = self.cfg.tap_drain_timeout
        names = ", ".join(self.taps.names)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        paused = threading.Event()
        drain = asyncio.ensure_future(
            asyncio.to_thread(self.taps.drain, self._tunnel_packets, timeout, cancel=paused)
        )
        stop = asyncio.ensure_future(self.mon.next_event(named("STOP"), mark, timeout + 1.0))
        try:
            await asyncio.wait({drain, stop}, return_when=asyncio.FIRST_COMPLETED)
            was_paused = stop.done() and stop.result() is not None
            paused.set()
            try:
                done = await drain
            except OSError as err:  # a raw socket refused: what is left waits for STOP
                self.progress.warn(f"frames taken off {names} are lost: {err}")
                return was_paused
        finally:
            paused.set()  # on an error too: the thread must not outlive the run
            stop.cancel()
            await asyncio.gather(drain, stop, return_exceptions=True)
        waited = (loop.time() - t0) * 1000
        self._report_taken(done.taken, done.forwarded)
        if was_paused:
            left = f"{', '.join(done.busy)} still held frames" if done.busy else "its tap was empty"
            self.progress.step(
                f"QEMU paused the VM by itself after {waited:.0f} ms of the drain ({left}); "
                "what is left follows through the tunnel"
            )
        elif done.busy:
            self.progress.step(
                f"{', '.join(done.busy)} still held frames for the VM after "
                f"{timeout:g} s; pausing anyway (they will follow through the tunnel)"
            )
        else:
            self.progress.step(f"{names} drained in {waited:.0f} ms")
        return was_paused

    def _tunnel_packets(self, packets: list[bytes]) -> int:
        """The packets for -vm-ip, taken off the VM's tap, for the tunnel: kept until the
        switch, sent at once after it (see tapqueue.Hold); returns how many.  Others
        (another of the VM's addresses, multicast) are not tunnelled: resent, they would
        come back to the same tap."""
        mine = [p for p in packets if tapqueue.destination(p) == self.cfg.vm_ip]
        return self.hold(mine, older=True)  # on the tap before the divert went in

    def _report_taken(self, taken: tapqueue.Leftovers, sent: int) -> None:
        """One line for what was taken off the tap and sent on, one warning for the rest."""
        assert self.tunnel is not None and self.taps is not None
        taps = ", ".join(self.taps.names)
        if sent:
            self.progress.step(
                f"{sent} packet(s) the VM had not read from {taps} taken for {self.tunnel.ifname}"
            )
        lost = taken.frames - taken.not_ip - sent
        if lost:
            self.progress.warn(
                f"{lost} packet(s) taken off {taps} could not be forwarded (not for "
                f"{self.cfg.vm_ip}, GSO, larger than the tunnel MTU, or malformed) and are lost"
            )

    async def _lift_switchover_limit(self) -> None:
        """Hand the pause back to QEMU (and restore what _ease_migration and the decision changed).

        Not `stop`: a VM paused by a client arrives paused at the destination (QEMU
        migrates the runstate).  A huge downtime-limit makes QEMU's next convergence
        check (every ~100 ms) pass, and QEMU pauses the VM itself, as "running".
        """
        lift = {**self.saved_params, "downtime-limit": migration.MAX_DOWNTIME_LIMIT_MS}
        if await self._ask("migrate-set-parameters", lift) is None:
            return  # QEMU is pausing the VM by itself, stuck: the STOP is read next
        self.saved_params = {}

    async def _forward_tap_leftovers(self) -> None:
        """Frames the paused VM had not read would die with the source QEMU: read them off
        its tap and keep them for the tunnel ahead of the diverted ones (tapqueue.Hold),
        or, once switched, send them through it after what it already carries (those are
        newer, so the destination sees them slightly reordered, not lost)."""
        if not (self.taps and self.taps.fds and self.tunnel):
            return
        try:
            left = await asyncio.to_thread(self.taps.take_leftovers)
            sent = await asyncio.to_thread(self._tunnel_packets, left.packets)
        except OSError as err:
            self.progress.warn(f"frames left on {', '.join(self.taps.names)} are lost: {err}")
            return
        self._report_taken(left, sent)

    async def _ease_migration(self, throttle: int) -> None:
        """Keep QEMU iterating, VM running, while the drain runs (limit 1 ms).

        - Bandwidth: with nothing left to send QEMU pauses the VM by itself, whatever
          the limits say, and a frame that reaches the tap at that moment (one already
          on its way through the node when traffic was switched) is parked by QEMU and
          lost.  At DRAIN_MAX_BANDWIDTH the migration thread sends a page, then sleeps
          out its 100 ms window, so the pages the guest dirties meanwhile stay pending.
          Without this cap (tried on 2026-11-30) QEMU paused the VM 12 and 30 ms into
          the drain and the CI e2e lost 1 ping each time.
        - Auto-converge: nothing converges any more, so QEMU would keep raising the
          throttle, up to 99 %, and the VM could not read its queue at all (also seen in
          the nested e2e).  The next throttle step QEMU takes is capped at 1 %.
        Both are restored when the limit is lifted, or in _cleanup.
        """
        params = await self.mon.execute("query-migrate-parameters")
        for key in EASED_PARAMS:  # the values before katamaran capped anything
            if key in params:
                self.saved_params.setdefault(key, params[key])
        throttles = dict.fromkeys(migration.THROTTLE_PARAMS, 1)
        eased = {"max-bandwidth": DRAIN_MAX_BANDWIDTH, **throttles}
        await self.mon.execute("migrate-set-parameters", eased)
        if throttle:
            self.progress.step(f"auto-converge throttle ({throttle}%) capped at 1% for the drain")

    def _show_ram(self, info: dict) -> None:
        ram = info.get("ram")
        if ram:
            self.progress.update(
                f"RAM {info.get('status')}: {mib(ram['transferred'])} sent, "
                f"{mib(ram['remaining'])} remaining"
            )

    async def _wait_migration_end(self, mark: int, timeout: float) -> None:
        end = migration_status("cancelled", "failed", "completed")
        try:
            await self.mon.wait_event(end, timeout, mark)
        except TimeoutError:
            pass

    async def _cancel_job(self, force: bool) -> None:
        mark = self.mon.mark()
        try:
            await self.mon.execute("block-job-cancel", {"device": self.job, "force": force})
        except QMPCommandError as err:
            if "not found" in err.desc:
                return  # ended by itself (an error on the target): nothing to cancel
            raise
        ended = named(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), device=self.job)
        try:
            await self.mon.wait_event(ended, self.cfg.switchover_timeout, mark)
            return
        except TimeoutError:
            # Requests stuck on a hung destination would hold the cancel for as long as
            # TCP retries: end the connection under them.
            self._cut_nbd()
            await self._yank_nbd()
        try:
            await self.mon.wait_event(ended, self.mon.timeout, mark)
        except TimeoutError:
            pass

    async def _yank_nbd(self) -> None:
        """QEMU's own cut of the NBD node's connection (`yank`, QEMU 6.0+): the one way
        for a re-run, which has no copy of a killed run's socket (_cut_nbd), to end a
        mirror stuck on a hung destination (test_sigkill_in_mirror_phase_then_rerun_recovers:
        without it the cancel waited 30 s and `blockdev-del` failed, node in use)."""
        node = {"type": "block-node", "node-name": NBD_NODE}
        try:
            await within(self.mon.execute("yank", {"instances": [node]}), self.mon.timeout)
        except (KatamaranError, asyncio.TimeoutError):
            pass  # no yank (QEMU < 6.0), no such node, or QEMU too busy: the wait decides

    async def _drop_nbd_node(self) -> None:
        if self.nbd_added:
            await self.mon.execute("blockdev-del", {"node-name": NBD_NODE})
            self.nbd_added = False

    async def _restore_settings(self) -> None:
        """Put back every capability/parameter this run changed (every exit path)."""
        self.saved_params = {}  # part of self.saved
        if self.saved is None:
            return
        await migration.restore(self.mon, self.saved)
        self.saved = None
        if self.lock:
            self.lock.clear_state()

    def _cut_nbd(self) -> None:
        if self.nbd_sock is not None:
            try:
                self.nbd_sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already disconnected

    async def _close_pending_fds(self) -> None:
        for name in sorted(self.pending_fds):
            await self._closefd(name)

    async def _regain_monitor(self) -> None:
        """Reconnect when QMP dropped but QEMU lives: only QMP can cancel its migration
        (else it would pause the VM in pre-switchover for good) or tell the outcome."""
        if note := await self.mon.regain():
            self.progress.warn(note)

    async def _cleanup(self) -> None:
        """Undo everything not needed any more; every step tolerates a dead QEMU, and a
        step that fails (any exception) never keeps the others from running."""
        await self._end_stop_watch()  # before the taps close: its take may be reading them
        await self._end_mirror_sync()
        self._release_taps()
        await self._regain_monitor()
        steps: list[tuple[str, object]] = []
        if self.migration_started and not self.completed:
            if self.phase.committed:
                steps.append(("migration", self._leave_committed))
            else:
                steps.append(("cancelling the migration", self._abort_migration))
        if self.mirror_started:
            steps.append((f"cancelling {self.job}", lambda: self._cancel_job(force=True)))
        if self.nbd_added:
            steps.append((f"removing {NBD_NODE}", self._drop_nbd_node))
        if self.pending_fds:
            steps.append(("closing passed fds", self._close_pending_fds))
        if self.gate:
            steps.append(("removing the switchover gate's bitmap", self._remove_gate))
        steps.append(("restoring migration settings", self._restore_settings))
        if self.tls:
            steps.append(("removing the TLS credentials", self.tls.remove))
        for what, step in steps:
            try:
                await step()  # type: ignore[operator]
            except Exception as err:  # noqa: BLE001 - the next steps must run regardless
                self.progress.warn(f"cleanup: {what}: {err}")
        # Only now: the job's cancel above may need to cut it (_cancel_job).  Closed before
        # the steps, a cancel stuck on a hung destination left the job running in QEMU
        # after katamaran exited (test_signal_in_mirror_phase_cancels_and_restores).
        if self.nbd_sock is not None:
            self.nbd_sock.close()
            self.nbd_sock = None
        if self.diverts or self.diverts_ready or self.diverting:
            try:
                await self._undivert()
            except Exception as err:  # noqa: BLE001
                self.progress.warn(f"cleanup: giving the taps their feed back: {err}")
        if self.tunnel:
            try:
                await netlink(self.tunnel.remove)
            except Exception as err:  # noqa: BLE001
                self.progress.warn(f"cleanup: removing tunnel {self.tunnel.ifname}: {err}")
            try:
                await netlink(self.tunnel.close)
            except Exception as err:  # noqa: BLE001
                self.progress.warn(f"cleanup: closing netlink: {err}")

    async def _end_mirror_sync(self) -> None:
        """-early-ram: stop waiting for READY (the job itself is cancelled below); its
        failure, already reported through the RAM loop or superseded, is not raised."""
        task = self.mirror_sync  # kept: `where` still names the phase it ended in
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _release_hold(self, what: str) -> tuple[int, int]:
        """tapqueue.Hold.release off the event loop: (held, sent); (0, 0) with a warning
        if the raw socket is refused (the kept packets are lost then)."""
        try:
            return await asyncio.to_thread(self.hold.release)
        except OSError as err:
            self.progress.warn(f"packets kept for {what} are lost: {err}")
            return 0, 0

    async def _give_back(self) -> None:
        """Given up before the switch: what was kept for the tunnel (see tapqueue.Hold) is
        resent on the node, whose own route takes it back to the VM's tap."""
        if self.hold.released:
            return
        held, sent = await self._release_hold("the tunnel")
        if held:
            self.progress.step(
                f"{sent} of {held} packet(s) kept for the tunnel given back to the VM"
            )

    def _say_tunnelled(self) -> None:
        """The migration was given up after the switch: what went into the tunnel waits
        in the destination's plug, which its cleanup drops (README: "A known loss")."""
        assert self.tunnel is not None
        if self.tunnel.tunnelled:
            self.progress.warn(
                f"given up after the switch: {self.tunnel.tunnelled} packet(s) went through "
                f"{self.tunnel.ifname} to the destination's hold, which drops them"
            )

    async def _leave_committed(self) -> None:
        """After migrate-continue: no cancel, no `cont`; the tunnel goes back only if the
        source runs the VM again (QEMU resumes it itself when the migration fails)."""
        if self.tunnel and await migration.vm_status(self.mon) == "running":
            await self._undivert()
            await netlink(self.tunnel.unswitch)
            self._say_tunnelled()
            await self._give_back()  # kept to the commit, not sent yet (_keeps_to_commit)

    async def _abort_migration(self) -> None:
        """Before the point of no return: cancel; the VM runs again unless something other
        than the migration paused it (an operator's `stop`, an I/O error).

        The VM's traffic: where it goes into the tunnel (switched at the STOP), it comes
        back first, so no more of it goes to a destination that will drop it.  Where
        katamaran keeps it (the gate, the pause before the commit), it comes back only
        after the cancel: until then QEMU may still pause the VM (the gate opened just
        before the signal), and at a pause QEMU drops every frame it holds for a guest
        with no room for it (its "complete all queued packets on VM stop").  Given back
        before the cancel, the burst of kept packets met such a pause and lost one (the
        gate cases, 3 runs in 15)."""
        tunnelled = self.tunnel is not None and self.tunnel.switched
        if tunnelled:
            await self._return_traffic()
        try:
            await self._cancel_migration()
        finally:
            if self.tunnel and not tunnelled:
                await self._return_traffic()

    async def _return_traffic(self) -> None:
        """The VM's traffic back to the source VM: the tap's feed before its route (see
        divert), then what katamaran kept for the tunnel."""
        assert self.tunnel is not None
        try:
            await self._undivert()
        finally:
            await netlink(self.tunnel.unswitch)
        self._say_tunnelled()
        await self._give_back()

    async def _cancel_migration(self) -> None:
        state = (await self.mon.execute("query-migrate")).get("status")
        if state in migration.ACTIVE_STATES:
            mark = self.mon.mark()
            self.progress.step(f"cancelling the migration (QEMU: {state})")
            await self.mon.execute("migrate_cancel")
            await self._wait_migration_end(mark, self.mon.timeout)
        status = await migration.vm_status(self.mon)
        if self.stopped_by:
            self.progress.step(f"migration aborted; source VM left {status} as it was paused")
            return
        if self.was_running and status != "running":
            await self.mon.execute("cont")
            status = await migration.vm_status(self.mon)
        self.progress.step(f"migration aborted; source VM {status}")
