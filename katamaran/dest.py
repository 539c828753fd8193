"""Destination side: accept the disk over NBD, hold the VM's packets, release at RESUME.

katamaran owns both listening sockets (see listener.py): it binds them in its own
network namespace, restricts them to -source-ip with a socket filter, and hands them to
QEMU with `getfd`: the NBD listener at once (`nbd-server-start` on an fd), the migration
stream only once a connection has shown the first bytes of one (`migrate-incoming fd:`).
Nothing here ever connects to a port to probe it.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import failpoint, gate, migration
from .aio import within
from .config import Config, host_port
from .errors import KatamaranError, QMPClosed, QMPCommandError
from .listener import MigrationListener, bound_address, open_listener
from .lock import VMLock
from .network import (
    MIN_FRAME,
    DestDecap,
    NetworkUnavailable,
    PlugQdisc,
    fit_tap_queue,
    netlink,
    tap_frames_needed,
)
from .progress import Progress
from .qmp import Event, Monitor, named
from .streambuf import size_stream
from .tls import TLSCreds

EXPORT_ID = "katamaran-export"
EXPORT_NODE = "katamaran-export"
NBD_FD = "katamaran-nbd-listener"  # getfd names, consumed by nbd-server-start / migrate-incoming
MIGRATION_FD = "katamaran-migration"
DECAP_QUIET = 1.0  # after the hold: decapsulate until no tunnelled packet came for this long
DECAP_MAX_WAIT = 60.0  # ...but at most this much longer
SYSCTL_JOURNAL = "sysctls"  # the lock's state part holding the changed sysctls
# Under -tls: how long a handed stream may take to become a migration (QEMU's TLS
# handshake, then `active`); see _handshake_done.
TLS_START_S = 20.0


class DestMigration:
    def __init__(
        self, cfg: Config, mon: Monitor, progress: Progress, lock: VMLock | None = None
    ) -> None:
        self.cfg = cfg
        self.mon = mon
        self.progress = progress
        self.lock = lock  # held by the caller; keeps the journal of changed sysctls
        self.decap: DestDecap | None = None
        self.plug: PlugQdisc | None = None
        self.nbd_running = False
        self.export_node_added = False
        self.nbd_address = ""
        self.incoming: MigrationListener | None = None
        self.qemu_listens = ""  # QEMU's own -incoming tcp: address, when it has one
        # Our copy of the stream handed to QEMU: a run that ends before the VM resumes
        # here shuts it down, so the incoming migration fails (see _close_stream).
        self.stream: socket.socket | None = None
        self.tls: TLSCreds | None = None
        # capabilities/parameters before this run changed them: put back at cleanup, so
        # the VM's next migration (by any tool) does not inherit pause-before-switchover
        self.saved: dict[str, dict[str, Any]] | None = None
        # Set once the VM runs here: from then on a signal only shortens the hold
        # (the first ends its fixed part, the next its wait for a quiet tunnel).
        self.resumed = False
        self.hold_cut = asyncio.Event()
        self.quiet_cut = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._check_state()
            await self._prepare_network()
            self.saved = await migration.snapshot(self.mon)
            await migration.set_capabilities(self.mon)
            if self.cfg.tls:
                self.tls = TLSCreds(self.mon, self.cfg)
                await self.tls.add()
            if not self.cfg.shared_storage:
                await self._start_nbd()
            mark = self.mon.mark()
            self._listen_incoming()
            self._warn_exposure()
            if self.plug:
                await netlink(self.plug.buffer)
            migration_at = self.incoming.address if self.incoming else self.qemu_listens
            self.progress.step(
                "destination ready: "
                + ("" if self.cfg.shared_storage else f"NBD on {self.nbd_address}, ")
                + f"incoming migration on {migration_at}"
                + (" (TLS)" if self.tls else "")
                + "; waiting for the VM"
            )
            await self._wait_resume(mark)
            self.resumed = True
            self._close_stream(shut=False)
            try:
                await self._after_resume()
            except QMPClosed as err:  # QEMU died once the VM ran here (a guest panic...)
                raise KatamaranError(self._gone(err)) from None
        finally:
            await self._cleanup()

    async def _after_resume(self) -> None:
        """The VM runs here: the held packets go to it, the NBD server stops, the network
        hears of the VM's new place, the hold lasts until the source's tunnel is quiet."""
        failpoint.hit("dest-resumed", self.progress.step)
        if self.plug:
            held = await netlink(self.plug.backlog)
            await netlink(self.plug.release)
            self.progress.step(f"VM resumed: released {held} held packet(s) in order")
        else:
            self.progress.step("VM resumed")
        await self._stop_nbd()
        await self.mon.execute(
            "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 100}
        )
        await self._remove_gate_bitmap()
        drops = await netlink(self.plug.drops) if self.plug else 0
        if drops:
            self.progress.warn(
                f"plug qdisc dropped {drops} packet(s): raise -plug-limit "
                f"(now {self.cfg.plug_limit} bytes)"
            )
        self.progress.step(f"migration received in {self.progress.elapsed():.2f} s")
        if self.decap and self.decap.rules:
            await self._hold_until_quiet()
        await self._check_alive()

    async def _check_state(self) -> None:
        status = await migration.vm_status(self.mon)
        if status != "inmigrate":
            removed = await self._remove_stale_network()
            note = f" (removed a killed run's {', '.join(removed)})" if removed else ""
            raise KatamaranError(
                f"QEMU at {self.mon.path} is {status}, not waiting for an incoming migration "
                f"(start the destination QEMU with -incoming defer){note}"
            )
        exports = await self.mon.execute("query-block-exports")
        if any(e["id"] == EXPORT_ID for e in exports):
            self.progress.warn("removing an NBD export left by an earlier run")
            await self.mon.execute("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
            await self._wait_export_gone()
            await self._quiet("nbd-server-stop")
        nodes = await self.mon.execute("query-named-block-nodes", {"flat": True})
        if any(node.get("node-name") == EXPORT_NODE for node in nodes):
            await self._quiet("blockdev-del", {"node-name": EXPORT_NODE})
        # QEMU started with -incoming tcp:... listens by itself (query-migrate says where).
        addresses = (await self.mon.execute("query-migrate")).get("socket-address") or []
        self.qemu_listens = ", ".join(
            host_port(a["host"], int(a["port"])) if a.get("type") == "inet" else str(a)
            for a in addresses
        )

    async def _remove_stale_network(self) -> list[str]:
        """A run killed after the VM arrived (in the tunnel hold) left its rules, hold
        veth and tunnel: a re-run with the same flags finds the VM running and removes
        them before it refuses, and puts back the sysctls it changed (their old values
        are in its journal next to the VM's lock)."""
        if not self.cfg.tap:
            return []
        try:
            decap = await self._new_decap("")
            try:
                return await self._remove_leftovers(decap)
            finally:
                await netlink(decap.close)
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(f"looking for a killed run's decapsulation: {err}")
            return []

    async def _prepare_network(self) -> None:
        if not self.cfg.tap:
            self.progress.warn("no -tap given: packets are not held during the cutover")
            return
        if not await netlink(self._tap_exists):
            raise KatamaranError(f"tap device {self.cfg.tap} not found")
        mac = await self._vm_mac()
        if mac is None:
            return
        self.decap = await self._new_decap(mac)
        scope = self.decap.scope()
        if scope:
            self.progress.warn(scope)
        try:
            for what in await self._remove_leftovers(self.decap):
                self.progress.warn(f"removed {what} left by an earlier run")
            for warning in await netlink(self.decap.setup):
                self.progress.warn(warning)
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(
                f"cannot steer tunnelled packets into {self.cfg.tap}: {err}; "
                "continuing without the tunnel and packet buffering"
            )
            await self._remove_network()
            return
        if not self.decap.devices:
            return
        self.progress.step(
            f"decapsulating on {', '.join(self.decap.devices)}"
            + (f" from {self.cfg.source_ip}" if self.cfg.source_ip else "")
            + (f" for {self.cfg.vm_ip}" if self.cfg.vm_ip else "")
            + f" into {self.decap.hold} -> {self.cfg.tap}"
        )
        try:
            self.plug = await netlink(PlugQdisc, self.decap.hold, self.cfg.plug_limit)
            await netlink(self.plug.install)
            self.progress.step(
                f"plug qdisc on {self.decap.hold} (limit {self.cfg.plug_limit} bytes)"
            )
            raised = await netlink(fit_tap_queue, self.decap.ipr, self.cfg.tap, self.cfg.plug_limit)
            if raised:
                self.progress.step(
                    f"{self.cfg.tap} txqueuelen {raised[0]} -> {raised[1]} "
                    "(room for everything the plug may release at once)"
                )
                smallest = tap_frames_needed(self.cfg.plug_limit)
                if raised[1] < smallest:
                    self.progress.warn(
                        f"the kernel took txqueuelen {raised[1]} for {self.cfg.tap}, not "
                        f"{smallest}: a release of more than {raised[1]} minimum-size frames "
                        f"at RESUME can overflow it (-plug-limit {raised[1] * MIN_FRAME} "
                        "or less fits)"
                    )
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(f"{err}; continuing without packet buffering")
            if self.plug is not None:
                await netlink(self.plug.close)
            self.plug = None

    async def _new_decap(self, mac: str) -> DestDecap:
        decap = await netlink(DestDecap, self.cfg.tap, mac, self.cfg.vm_ip, self.cfg.source_ip)
        decap.journal = self._journal_sysctls
        return decap

    async def _remove_leftovers(self, decap: DestDecap) -> list[str]:
        """What a killed run for this VM left: its network, then its changed sysctls."""
        removed = await netlink(decap.remove_stale)
        return removed + await netlink(decap.restore_sysctls, self._stale_sysctls())

    def _stale_sysctls(self) -> dict[str, str]:
        """The sysctls an earlier run changed and did not put back (it was killed)."""
        found = self.lock.load_state(SYSCTL_JOURNAL) if self.lock else None
        if not isinstance(found, dict):
            return {}
        return {str(k): str(v) for k, v in found.items()}

    def _journal_sysctls(self, changed: dict[str, str]) -> None:
        if self.lock is None:
            return
        if changed:
            self.lock.save_state(changed, SYSCTL_JOURNAL)
        else:
            self.lock.clear_state(SYSCTL_JOURNAL)

    def _tap_exists(self) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.cfg.tap))

    async def _vm_mac(self) -> str | None:
        """The VM NIC's MAC: the hold veth addresses held packets to it (no ARP there)."""
        nics = await self.mon.execute("query-rx-filter")
        macs = sorted({nic["main-mac"] for nic in nics if nic.get("main-mac")})
        if len(macs) != 1:
            self.progress.warn(
                f"cannot steer tunnelled packets into {self.cfg.tap}: "
                f"{len(macs)} NIC MACs in this VM ({', '.join(macs) or 'none'})"
            )
            return None
        return macs[0]

    async def _hold_until_quiet(self) -> None:
        """Keep decapsulating for the hold, then for as long as tunnelled packets arrive.

        Each side's -tunnel-hold starts at its own moment: the source may still tunnel
        when this side's hold ends.  The hold veth counts this migration's tunnelled
        packets only; once it has not moved for DECAP_QUIET s (at most DECAP_MAX_WAIT s
        more), the source has stopped tunnelling.
        """
        assert self.decap is not None
        await self._wait_unless(self.hold_cut, self.cfg.tunnel_hold)
        loop = asyncio.get_running_loop()
        start = loop.time()
        last, still_since = await netlink(self.decap.forwarded), start
        while loop.time() - still_since < DECAP_QUIET:
            if loop.time() - start >= DECAP_MAX_WAIT:
                self.progress.warn(
                    f"tunnelled packets still arrive {DECAP_MAX_WAIT:g} s after the hold: "
                    "removing the decapsulation anyway"
                )
                break
            if await self._wait_unless(self.quiet_cut, 0.1):
                if self.mon.closed:
                    return  # _check_alive says what happened
                self.progress.step(
                    f"decapsulation removed before the tunnel was quiet ({last} packet(s) "
                    "tunnelled in all)"
                )
                return
            now = await netlink(self.decap.forwarded)
            if now != last:
                last, still_since = now, loop.time()
        self.progress.step(
            f"tunnel quiet for {DECAP_QUIET:g} s ({last} packet(s) tunnelled in all): "
            "decapsulation removed"
        )
        await self._report_hold_drops()

    async def _report_hold_drops(self) -> None:
        """Say whether the hold lost any tunnelled packet on its way to the tap (the plug
        past its limit, the veth pair), while the counters still exist."""
        assert self.decap is not None
        plug = await netlink(self.plug.drops) if self.plug else 0
        veth = await netlink(self.decap.dropped)
        if plug or veth:
            self.progress.warn(
                f"{plug + veth} tunnelled packet(s) dropped on the way to {self.cfg.tap} "
                f"(plug qdisc: {plug}, hold veth {self.decap.hold}: {veth})"
            )

    async def _wait_unless(self, cut: asyncio.Event, seconds: float) -> bool:
        """Wait `seconds`; True as soon as `cut` is set (a signal, see on_signal) or the
        QMP connection is gone (QEMU exited: nothing left to hold packets for)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not (cut.is_set() or self.mon.closed):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await within(cut.wait(), min(remaining, 0.2))
            except asyncio.TimeoutError:
                pass
        return True

    async def _check_alive(self) -> None:
        """QEMU died after the VM resumed here: neither side runs the VM any more (the
        source QEMU is `postmigrate`).  Exit 1 saying so, not 0."""
        try:
            await migration.vm_status(self.mon)
        except QMPClosed as err:
            raise KatamaranError(self._gone(err)) from None

    @staticmethod
    def _gone(err: QMPClosed) -> str:
        return (
            f"after the VM resumed here: the destination QEMU is gone ({err}); the VM "
            "runs on neither node (its source QEMU is postmigrate)"
        )

    def on_signal(self, name: str) -> bool:
        """Whether a SIGINT/SIGTERM/SIGHUP may cancel the run now (cli's handler asks).

        Until the VM runs here, yes: cleanup stops the NBD server and the listeners, and
        the source cancels (its streams break) unless it has committed.  Once the VM
        runs here the migration is done and the run ends normally (exit 0), as on the
        source; but the source may still tunnel the VM's packets (its hold runs on its
        own clock), and removing the decapsulation then would drop them.  So the first
        signal ends the fixed hold and keeps decapsulating until the tunnel is quiet
        (at most DECAP_MAX_WAIT s); a second one removes it at once.
        """
        if not self.resumed:
            return True
        if self.decap is None or not self.decap.rules:
            self.progress.warn(f"{name}: the VM runs here; finishing (no tunnel to hold)")
        elif not self.hold_cut.is_set():
            self.hold_cut.set()
            self.progress.warn(
                f"{name}: the VM runs here; tunnel hold cut short: decapsulating only until "
                "the source's tunnel is quiet (signal again to stop now)"
            )
        else:
            self.quiet_cut.set()
            self.progress.warn(f"{name}: removing the decapsulation now")
        return False

    async def _start_nbd(self) -> None:
        """QEMU's NBD server on a listening socket katamaran made (see listener.py).

        QEMU owns the socket from `nbd-server-start` on and closes it at `nbd-server-stop`.
        One connection at a time: the source's.
        """
        port = self.cfg.nbd_port
        what = f"NBD server start failed on port {port}"
        sock = open_listener(what, port, self.cfg.listen_ip, self.cfg.source_ip)
        self.nbd_address = bound_address(sock)
        args: dict[str, object] = {
            "addr": {"type": "fd", "data": {"str": NBD_FD}},
            "max-connections": 1,
        }
        if self.tls:
            args["tls-creds"] = self.tls.id
        try:
            await self.mon.send_socket(NBD_FD, sock)
            await self.mon.execute("nbd-server-start", args)
        except QMPCommandError as err:
            await self._quiet("closefd", {"fdname": NBD_FD})
            raise KatamaranError(f"{what}: {err.desc}") from None
        finally:
            sock.close()  # QEMU holds its own copy (or none, after closefd)
        self.nbd_running = True
        node = await self._drive_node()
        export = {
            "type": "nbd",
            "id": EXPORT_ID,
            "name": self.cfg.drive_id,
            "writable": True,
        }
        try:
            await self.mon.execute("block-export-add", {**export, "node-name": node["node"]})
        except QMPCommandError as err:
            if "read-only" not in err.desc:
                raise KatamaranError(f"NBD server start failed: {err.desc}") from None
            # QEMU 7.2 cannot activate a legacy -drive node while in incoming state; export
            # a second node on the same image (no locks, flushed by the mirror before the
            # switchover) and let QEMU reopen its own node when the VM activates.
            await self.mon.execute(
                "blockdev-add",
                {
                    "driver": node["format"],
                    "node-name": EXPORT_NODE,
                    "file": {"driver": "file", "filename": node["file"], "locking": "off"},
                },
            )
            self.export_node_added = True
            await self.mon.execute("block-export-add", {**export, "node-name": EXPORT_NODE})
        self.progress.step(
            f"NBD export {self.cfg.drive_id} (writable) on {self.nbd_address}"
            + (f", only for {self.cfg.source_ip}" if self.cfg.source_ip else "")
        )

    async def _drive_node(self) -> dict[str, str]:
        for block in await self.mon.execute("query-block"):
            if block.get("device") == self.cfg.drive_id or block.get("qdev") == self.cfg.drive_id:
                inserted = block.get("inserted")
                if inserted:
                    return {
                        "node": inserted["node-name"],
                        "format": inserted["drv"],
                        "file": inserted["file"],
                    }
        for node in await self.mon.execute("query-named-block-nodes", {"flat": True}):
            if node.get("node-name") == self.cfg.drive_id:
                return {"node": node["node-name"], "format": node["drv"], "file": node["file"]}
        raise KatamaranError(f"NBD server start failed: no drive {self.cfg.drive_id!r} here")

    def _listen_incoming(self) -> None:
        if self.qemu_listens:
            self.progress.warn(
                f"QEMU is already listening for the migration itself on {self.qemu_listens} "
                "(-incoming tcp): katamaran cannot filter that listener; start the "
                "destination QEMU with -incoming defer"
            )
            return
        sock = open_listener(
            "cannot listen for the incoming migration",
            self.cfg.migration_port,
            self.cfg.listen_ip,
            self.cfg.source_ip,
            self.cfg.stream_buffer or 0,  # "auto" sizes the accepted connection
        )
        self.incoming = MigrationListener(
            sock, self.cfg.tls, self.cfg.source_ip, self.progress.step
        )

    def _warn_exposure(self) -> None:
        """One line saying what a stranger could reach, when nothing restricts it."""
        if self.cfg.source_ip is not None:
            return
        if self.cfg.tls:
            self.progress.warn(
                "-tls without -source-ip: any host that reaches this node may open the first "
                "TLS connection to the migration port, which goes to QEMU; a stranger's ends "
                "this wait (it cannot pass QEMU's certificate check); give -source-ip"
            )
            return
        migration_at = self.incoming.address if self.incoming else self.qemu_listens
        if self.cfg.shared_storage:
            what = f"the migration port {migration_at} is"
        else:
            what = (
                f"NBD export {self.cfg.drive_id} (read-write) on {self.nbd_address} "
                f"and the migration port {migration_at} are"
            )
        self.progress.warn(
            f"{what} open to any host that reaches this node, until the VM resumes "
            f"(at most -dest-timeout {self.cfg.dest_timeout:g} s); give -source-ip and/or -tls"
        )

    async def _hand_over(self, conn: socket.socket, peer: str) -> None:
        """The first connection that is a migration stream goes to QEMU."""
        if sized := size_stream(conn, self.cfg.stream_buffer, socket.SO_RCVBUF):
            self.progress.step(sized)  # what the destination loads during the pause
        await self.mon.send_socket(MIGRATION_FD, conn)
        self.stream = conn.dup()
        mark = self.mon.mark()
        try:
            await self.mon.execute("migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"})
        except QMPCommandError as err:
            await self._quiet("closefd", {"fdname": MIGRATION_FD})
            raise KatamaranError(f"cannot start the incoming migration: {err.desc}") from None
        assert self.incoming is not None
        self.progress.step(
            f"migration stream from {peer} handed to QEMU; listener {self.incoming.address} closed"
        )
        if self.cfg.tls:
            await self._handshake_done(mark, peer)

    async def _handshake_done(self, mark: int, peer: str) -> None:
        """Under -tls the listener can check only that a stream starts with a TLS record,
        so without -source-ip a stranger's handshake (a TLS health check, a client with no
        certificate of the CA) may be the one handed over.  QEMU then refuses its
        certificate, says nothing and waits on: it takes one incoming migration, so the
        real source would find the port closed and this side would wait -dest-timeout.
        A stream whose handshake has not become a migration within TLS_START_S ends the
        run instead (measured: QEMU's status stays empty, no MIGRATION event)."""

        def begun(event: Event) -> bool:
            """Active (the handshake passed) or failed (_wait_resume_events says so)."""
            status = event.get("data", {}).get("status")
            return named("MIGRATION")(event) and status not in ("none", "setup")

        if await self.mon.next_event(begun, mark, TLS_START_S) is not None:
            return
        raise KatamaranError(
            f"the TLS stream from {peer} became no migration within {TLS_START_S:g}s (QEMU "
            "refused its certificate or it stalled: a TLS health check, a client without a "
            "certificate of the CA?); QEMU takes one incoming migration: restart the "
            "destination, with -source-ip to keep other hosts out"
        )

    async def _wait_resume(self, mark: int) -> None:
        """Wait for RESUME while the migration listener accepts (and rejects) connections."""
        waiter = asyncio.create_task(self._wait_resume_events(mark))
        tasks: list[asyncio.Task[Any]] = [waiter]
        if self.incoming:
            tasks.append(asyncio.create_task(self.incoming.accept_stream(self._hand_over)))
        try:
            pending: set[asyncio.Task[Any]] = set(tasks)
            while waiter in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a failure of either ends the wait
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _wait_resume_events(self, mark: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.dest_timeout
        watch = named(("RESUME", "MIGRATION"))
        while True:
            found = await self.mon.next_event(watch, mark, deadline - loop.time())
            if found is None:
                raise KatamaranError(
                    f"migration did not complete within {self.cfg.dest_timeout:g}s "
                    "(no RESUME on the destination; raise -dest-timeout)"
                )
            mark, event = found
            if event["event"] == "RESUME":
                return
            status = event["data"].get("status")
            if status in ("failed", "cancelled"):
                self._close_stream(shut=False)  # QEMU's load has ended
                raise KatamaranError(f"QEMU reported migration failed: incoming migration {status}")
            if status == "active":
                self.progress.step("incoming migration started")

    async def _stop_nbd(self) -> None:
        if self.nbd_running:
            await self._quiet("block-export-del", {"id": EXPORT_ID, "mode": "hard"})
            await self._wait_export_gone()
            await self._quiet("nbd-server-stop")
            self.nbd_running = False
        if self.export_node_added:
            await self._quiet("blockdev-del", {"node-name": EXPORT_NODE})
            self.export_node_added = False

    async def _wait_export_gone(self) -> None:
        deadline = time.monotonic() + self.mon.timeout
        while time.monotonic() < deadline:
            exports = await self.mon.execute("query-block-exports")
            if not any(e["id"] == EXPORT_ID for e in exports):
                return
            await asyncio.sleep(0.05)

    async def _remove_gate_bitmap(self) -> None:
        """The source's switchover gate (see gate) came with the VM: it tracks nothing,
        but it is katamaran's, so it goes."""
        try:
            nodes = await gate.remove_all(self.mon)
        except QMPCommandError as err:
            self.progress.warn(f"removing the switchover gate's bitmap: {err}")
            return
        if nodes:
            self.progress.step(f"switchover gate's bitmap removed from {', '.join(nodes)}")

    async def _quiet(self, command: str, args: dict[str, object] | None = None) -> None:
        try:
            await self.mon.execute(command, args)
        except QMPCommandError:
            pass  # already gone

    def _close_stream(self, *, shut: bool) -> None:
        """Close katamaran's copy of the migration stream; with `shut` (the run ends
        before the VM resumed here) shut it down first: QEMU holds the same socket, so
        its load fails and the destination QEMU never runs the VM.

        Why: a run that ends early (a signal, -dest-timeout, a lost QMP connection)
        removes the NBD server, the plug and the decapsulation.  Left alone, the
        incoming migration would go on and the VM would resume here without them: its
        held packets dropped, the source's tunnel decapsulated by nobody, and this run
        exiting as if cancelled.  Cut, the source sees its migration fail: cancelled
        before its point of no return, resumed by QEMU itself after it (return-path).
        """
        stream, self.stream = self.stream, None
        if stream is None:
            return
        if shut:
            try:
                stream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
            else:
                self.progress.warn(
                    "incoming migration stream shut down: the VM did not resume here"
                )
        stream.close()

    async def _cleanup(self) -> None:
        """Every step runs even when an earlier one failed (a dead QEMU, a netlink error)."""
        if self.incoming:
            self.incoming.close()
        self._close_stream(shut=not self.resumed)
        if note := await self.mon.regain():  # QMP dropped, QEMU lives: its NBD server must go
            self.progress.warn(note)
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [("NBD", self._stop_nbd)]
        if self.saved is not None:
            saved = self.saved
            steps.append(
                ("restoring migration settings", lambda: migration.restore(self.mon, saved))
            )
        if self.tls:
            steps.append(("removing the TLS credentials", self.tls.remove))
        steps.append(("network", self._remove_network))
        for what, step in steps:
            try:
                await step()
            except Exception as err:  # noqa: BLE001 - the next steps must run regardless
                self.progress.warn(f"cleanup: {what}: {err}")

    async def _remove_network(self) -> None:
        """Rules first (nothing new enters the hold), then drain the plug, then the rest."""
        steps = []
        if self.decap is not None:
            steps.append(self.decap.unsteer)
        if self.plug is not None:
            steps += [self.plug.remove, self.plug.close]
        if self.decap is not None:
            steps += [self.decap.teardown, self.decap.close]
        for step in steps:
            try:
                await netlink(step)
            except (NetlinkError, OSError) as err:
                self.progress.warn(f"cleanup: {err}")
        self.plug = self.decap = None
