"""`python -m pytest_katamaran.demo`: one real live migration on this machine, end to end.

Two network-namespace "nodes", a small VM (TCG) that keeps writing to its disk on node A,
`katamaran -mode dest` on node B, `katamaran -mode source` on node A; then the checks a
user would make by hand: destination running, source postmigrate, no write lost.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pytest_katamaran.checks.disk import last_ack, verify_writes
from pytest_katamaran.images.guest import build_guest
from pytest_katamaran.lab.local import GuestPanicked, Rig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_katamaran.demo", description=__doc__)
    parser.add_argument("--shared-storage", action="store_true", help="skip the NBD mirror")
    parser.add_argument("--ipv6", action="store_true", help="migrate over IPv6 (fd00:10::2)")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"demo: {message}", file=sys.stderr, flush=True)

    say("building the test guest (cached after the first run)")
    guest = build_guest()
    with tempfile.TemporaryDirectory(prefix="katamaran-demo-") as tmp:
        rig = Rig(guest, Path(tmp), writer=True, shared=args.shared_storage, echo=True)
        try:
            started = time.monotonic()
            say("node A / node B namespaces up; booting the VM on node A (TCG)")
            rig.up()
            say(f"VM booted in {rig.src.boot_time:.1f} s; it writes to its disk continuously")
            dest = rig.start_dest()
            source = rig.start_source("fd00:10::2" if args.ipv6 else "10.0.0.2")
            src_rc, dst_rc = rig.finish(source), rig.finish(dest)
            if src_rc or dst_rc:
                say(f"FAILED: katamaran source exited {src_rc}, dest exited {dst_rc}")
                return 1
            try:
                src_state, dst_state = rig.status(rig.src), rig.status(rig.dst)
            except GuestPanicked as panic:
                say(f"FAILED: the destination guest kernel panicked after migration ({panic});")
                say("seen under TCG with QEMU 7.2 with bare QMP too - run the demo again")
                return 1
            say(f"source VM: {src_state}, destination VM: {dst_state}")
            acked_src = last_ack(rig.src.console_log)
            time.sleep(1.0)  # let the writer ack a few more writes on the destination
            acked = max(acked_src, last_ack(rig.dst.console_log))
            rig.src.stop()
            rig.dst.stop()
            report = verify_writes(rig.dst_disk, acked)
            say(f"disk: {acked} writes acknowledged by the guest ({acked_src} before the switch)")
            say(f"disk check: {report}")
            ok = report.ok and src_state == "postmigrate" and dst_state == "running"
            say(f"{'OK' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
            return 0 if ok else 1
        finally:
            rig.down()


if __name__ == "__main__":
    sys.exit(main())
