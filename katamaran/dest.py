"""Destination side: accept the disk over NBD, hold the VM's packets, release at RESUME.

Nothing here connects to the incoming migration port: QEMU treats any connection on it
as the migration stream and aborts the incoming migration when it is not one.
"""

from __future__ import annotations

import asyncio
import time

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import migration
from .config import Config, host_port
from .errors import KatamaranError, QMPCommandError
from .network import DestDecap, NetworkUnavailable, PlugQdisc, fit_tap_queue, netlink
from .progress import Progress
from .qmp import Monitor, named

EXPORT_ID = "katamaran-export"
EXPORT_NODE = "katamaran-export"
DECAP_QUIET = 1.0  # after the hold: decapsulate until no tunnelled packet came for this long
DECAP_MAX_WAIT = 60.0  # ...but at most this much longer


class DestMigration:
    def __init__(self, cfg: Config, mon: Monitor, progress: Progress) -> None:
        self.cfg = cfg
        self.mon = mon
        self.progress = progress
        self.decap: DestDecap | None = None
        self.plug: PlugQdisc | None = None
        self.nbd_running = False
        self.export_node_added = False

    async def run(self) -> None:
        try:
            await self._check_state()
            await self._prepare_network()
            await migration.set_capabilities(self.mon)
            if not self.cfg.shared_storage:
                await self._start_nbd()
            mark = self.mon.mark()
            await self._listen_incoming()
            if self.plug:
                await netlink(self.plug.buffer)
            self.progress.step(
                "destination ready: "
                + ("" if self.cfg.shared_storage else f"NBD on port {self.cfg.nbd_port}, ")
                + f"incoming migration on port {self.cfg.migration_port}; waiting for the VM"
            )
            await self._wait_resume(mark)
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
            drops = await netlink(self.plug.drops) if self.plug else 0
            if drops:
                self.progress.warn(
                    f"plug qdisc dropped {drops} packet(s): raise -plug-limit "
                    f"(now {self.cfg.plug_limit} bytes)"
                )
            self.progress.step(f"migration received in {self.progress.elapsed():.2f} s")
            if self.decap and self.decap.rules:
                await self._hold_until_quiet()
        finally:
            await self._cleanup()

    async def _check_state(self) -> None:
        status = await migration.vm_status(self.mon)
        if status != "inmigrate":
            raise KatamaranError(
                f"QEMU at {self.mon.path} is {status}, not waiting for an incoming migration "
                "(start the destination QEMU with -incoming defer or -incoming tcp:...)"
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

    async def _prepare_network(self) -> None:
        if not self.cfg.tap:
            self.progress.warn("no -tap given: packets are not held during the cutover")
            return
        if not await netlink(self._tap_exists):
            raise KatamaranError(f"tap device {self.cfg.tap} not found")
        mac = await self._vm_mac()
        if mac is None:
            return
        self.decap = await netlink(DestDecap, self.cfg.tap, mac, self.cfg.vm_ip, self.cfg.source_ip)
        scope = self.decap.scope()
        if scope:
            self.progress.warn(scope)
        try:
            for what in await netlink(self.decap.remove_stale):
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
        except (NetworkUnavailable, NetlinkError, OSError) as err:
            self.progress.warn(f"{err}; continuing without packet buffering")
            if self.plug is not None:
                await netlink(self.plug.close)
            self.plug = None

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
        await asyncio.sleep(self.cfg.tunnel_hold)
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
            await asyncio.sleep(0.1)
            now = await netlink(self.decap.forwarded)
            if now != last:
                last, still_since = now, loop.time()
        self.progress.step(
            f"tunnel quiet for {DECAP_QUIET:g} s ({last} packet(s) tunnelled in all): "
            "decapsulation removed"
        )

    async def _start_nbd(self) -> None:
        port = str(self.cfg.nbd_port)
        await migration.listen(
            self.mon,
            "nbd-server-start",
            lambda host: {"addr": {"type": "inet", "data": {"host": host, "port": port}}},
            f"NBD server start failed on port {port}",
        )
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
        self.progress.step(f"NBD export {self.cfg.drive_id} (writable) on port {port}")

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

    async def _listen_incoming(self) -> None:
        port = str(self.cfg.migration_port)
        try:
            await migration.listen(
                self.mon,
                "migrate-incoming",
                lambda host: {"uri": f"tcp:{host_port(host, int(port))}"},
                "cannot listen for the incoming migration",
            )
        except KatamaranError as err:
            if "already been started" in str(err):
                self.progress.step("QEMU is already listening for the migration (-incoming tcp)")
                return
            raise

    async def _wait_resume(self, mark: int) -> None:
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

    async def _quiet(self, command: str, args: dict[str, object] | None = None) -> None:
        try:
            await self.mon.execute(command, args)
        except QMPCommandError:
            pass  # already gone

    async def _cleanup(self) -> None:
        try:
            await self._stop_nbd()
        except KatamaranError as err:
            self.progress.warn(f"cleanup: {err}")
        await self._remove_network()

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
