"""`katamaran` command line: Go-style single-dash flags, one-line errors, exit codes.

Exit codes: 0 done, 1 runtime failure (cleaned up; the source VM runs), 2 bad input,
3 outcome uncertain after the point of no return (nothing resumed; the operator decides),
130 interrupted before the point of no return (SIGINT/SIGTERM/SIGHUP; cleaned up).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__, config, listener, tls
from .config import Config
from .errors import Aborted, KatamaranError, UsageError
from .progress import Progress

USAGE = "Usage: katamaran -mode source|dest [flags]  (katamaran -help lists the flags)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: object) -> None:
    parser.add_argument(f"-{name}", f"--{name}", dest=name.replace("-", "_"), **kwargs)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="katamaran",
        usage="katamaran -mode source|dest [flags]",
        description="Zero-packet-drop live migration of a Kata Containers VM over QMP.",
        add_help=False,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "destination first:  katamaran -mode dest -qmp SOCK -tap tap0_kata\n"
            "then the source:    katamaran -mode source -qmp SOCK -dest-ip IP -vm-ip IP\n"
            "exit codes: 0 done, 1 failed (cleaned up), 2 bad input, 3 outcome uncertain\n"
            "after migrate-continue (nothing resumed: check the destination), 130 interrupted"
        ),
    )
    _flag(parser, "mode", metavar="MODE", help="migration role: 'source' or 'dest' (required)")
    _flag(
        parser,
        "qmp",
        metavar="PATH",
        default=str(config.DEFAULT_QMP),
        help=f"QEMU QMP unix socket of the VM (default {config.DEFAULT_QMP})",
    )
    _flag(
        parser,
        "tap",
        metavar="IFACE",
        default="",
        help="dest: the VM's tap device, where sch_plug holds packets until the VM resumes",
    )
    _flag(parser, "dest-ip", metavar="IP", help="source: destination node IP (IPv4 or IPv6)")
    _flag(
        parser,
        "vm-ip",
        metavar="IP",
        help="source: the VM's (pod's) IP, tunnelled at cutover; "
        "dest (optional): pinned as a neighbour on -tap during the cutover",
    )
    _flag(
        parser,
        "source-ip",
        metavar="IP",
        help="dest: the source node's IP; only it may connect to NBD/migration or tunnel in",
    )
    _flag(
        parser,
        "listen-ip",
        metavar="IP",
        help="dest: bind the NBD and migration listeners to this address (default: all)",
    )
    _flag(
        parser,
        "tls",
        action="store_true",
        help="both sides: NBD and migration streams over TLS (x509 files from -tls-dir)",
    )
    _flag(
        parser,
        "tls-dir",
        metavar="DIR",
        default=str(config.TLS_DIR),
        help="x509 files in libvirt's layout: ca-cert.pem, server-cert.pem/server-key.pem, "
        f"client-cert.pem/client-key.pem (default {config.TLS_DIR})",
    )
    for name, default in (("nbd-port", config.NBD_PORT), ("migration-port", config.MIGRATION_PORT)):
        _flag(
            parser, name, metavar="PORT", default=str(default), help=f"TCP port (default {default})"
        )
    _flag(
        parser,
        "drive-id",
        metavar="ID",
        default=config.DEFAULT_DRIVE_ID,
        help=f"QEMU drive to mirror over NBD (default {config.DEFAULT_DRIVE_ID})",
    )
    _flag(
        parser,
        "shared-storage",
        action="store_true",
        help="both nodes see the same disk: skip the NBD drive-mirror",
    )
    _flag(
        parser,
        "copy-mode",
        metavar="MODE",
        default=config.COPY_MODE,
        help="source: drive-mirror copy mode, 'auto' (background, then write-blocking once "
        "synchronized, where QEMU 8.2+ can switch), 'background' or 'write-blocking' "
        f"(default {config.COPY_MODE})",
    )
    _flag(
        parser,
        "early-ram",
        metavar="BOOL",
        nargs="?",
        const="true",
        default="true" if config.EARLY_RAM else "false",
        help="source: start the RAM copy while the disk is still mirrored, held at the "
        "switchover gate until the mirror is READY (needs QEMU 8.2+, KVM or 9.0+ under TCG, "
        "and -vm-ip; elsewhere the disk is synchronized first); -early-ram=false always "
        f"synchronizes the disk first (default {str(config.EARLY_RAM).lower()})",
    )
    for name, default, what in (
        ("migration-timeout", config.MIGRATION_TIMEOUT, "RAM migration must complete within"),
        ("storage-sync-timeout", config.STORAGE_SYNC_TIMEOUT, "drive-mirror must sync within"),
        ("qmp-timeout", config.QMP_TIMEOUT, "each QMP command must be answered within"),
        ("tunnel-hold", config.TUNNEL_HOLD, "keep the tunnel after cutover (CNI convergence)"),
        ("dest-timeout", config.DEST_TIMEOUT, "dest: wait at most this long for the VM to resume"),
        (
            "tap-drain-timeout",
            config.TAP_DRAIN_TIMEOUT,
            "source: longest spent taking the VM's tap queue off it before the pause",
        ),
        (
            "switchover-timeout",
            config.SWITCHOVER_TIMEOUT,
            "source: the mirror drain with the VM paused must end within (else the "
            "migration is cancelled and the source runs)",
        ),
    ):
        _flag(
            parser,
            name,
            metavar="SECONDS",
            default=str(default),
            help=f"{what} (default {default:g})",
        )
    _flag(
        parser,
        "plug-limit",
        metavar="BYTES",
        default=str(config.PLUG_LIMIT),
        help=f"dest: bytes sch_plug may hold while the VM is paused (default {config.PLUG_LIMIT})",
    )
    _flag(
        parser,
        "stream-buffer",
        metavar="auto|BYTES",
        default="auto",
        help="both sides: socket buffer of the RAM migration stream (bytes, or 0 for the "
        "kernel's autotuning); what it holds when the VM pauses is sent during the pause, "
        "and the stream runs at most at about 2 x buffer / RTT (default auto: sized from "
        "the connection's RTT)",
    )
    _flag(
        parser,
        "downtime-limit",
        metavar="MS",
        default=str(config.DOWNTIME_LIMIT_MS),
        help=f"source: max downtime QEMU aims for (default {config.DOWNTIME_LIMIT_MS})",
    )
    parser.add_argument("-help", "--help", "-h", action="help", help="show this help and exit")
    parser.add_argument(
        "-version", "--version", action="version", version=f"katamaran {__version__}"
    )
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    return parser


def _ip(flag: str, value: str | None) -> config.IPAddress | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise UsageError(f'invalid -{flag} "{value}" (want an IPv4 or IPv6 address)') from None


def _number(flag: str, value: str, kind: type = float) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise UsageError(f'invalid -{flag} "{value}" (want a number)') from None
    if number < 0 or number != number:
        raise UsageError(f'invalid -{flag} "{value}" (must not be negative)')
    return number


def _bool(flag: str, value: str) -> bool:
    """A Go-style boolean flag's value (-flag, -flag=true, -flag=false)."""
    known = {"true": True, "1": True, "t": True, "false": False, "0": False, "f": False}
    if value.lower() not in known:
        raise UsageError(f'invalid -{flag} "{value}" (want true or false)')
    return known[value.lower()]


def _port(flag: str, value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise UsageError(f'invalid -{flag} "{value}" (want a TCP port, 1-65535)')
    return port


def parse_args(argv: Sequence[str]) -> Config:
    """Validate everything before anything on the node is touched."""
    if not argv:
        raise UsageError("no mode given")
    args = build_parser().parse_args(argv)
    if args.rest:
        raise UsageError(f"unexpected argument(s): {' '.join(args.rest)}")
    if args.mode is None:
        raise UsageError("-mode is required")
    if args.mode not in ("source", "dest"):
        raise UsageError(f"invalid mode \"{args.mode}\" (must be 'source' or 'dest')")
    dest_ip = _ip("dest-ip", args.dest_ip)
    vm_ip = _ip("vm-ip", args.vm_ip)
    source_ip = _ip("source-ip", args.source_ip)
    listen_ip = _ip("listen-ip", args.listen_ip)
    nbd_port = _port("nbd-port", args.nbd_port)
    migration_port = _port("migration-port", args.migration_port)
    if nbd_port == migration_port:
        raise UsageError(f"-nbd-port and -migration-port must differ (both {nbd_port})")
    if args.mode == "source" and (dest_ip is None or vm_ip is None):
        raise UsageError("-dest-ip and -vm-ip are required for source mode")
    if args.mode == "source" and (source_ip is not None or listen_ip is not None):
        raise UsageError("-source-ip and -listen-ip are destination flags (-mode dest)")
    if source_ip is not None and listen_ip is not None:
        if listener.plain(source_ip).version != listener.plain(listen_ip).version:
            raise UsageError(
                f"-source-ip {source_ip} can never reach -listen-ip {listen_ip} "
                "(give both as IPv4 or both as IPv6)"
            )
    if not args.qmp:
        raise UsageError("-qmp must name the QMP socket")
    if not args.shared_storage and not args.drive_id:
        raise UsageError("-drive-id must not be empty (or use -shared-storage)")
    if _number("switchover-timeout", args.switchover_timeout) == 0:
        raise UsageError('invalid -switchover-timeout "0" (must be positive)')
    if args.copy_mode not in config.COPY_MODES:
        raise UsageError(
            f'invalid -copy-mode "{args.copy_mode}" '
            "(must be 'auto', 'background' or 'write-blocking')"
        )
    stream_buffer = None
    if args.stream_buffer != "auto":
        if not (args.stream_buffer.isascii() and args.stream_buffer.isdigit()):
            raise UsageError(
                f'invalid -stream-buffer "{args.stream_buffer}" (want auto, 0 or a number of bytes)'
            )
        stream_buffer = int(args.stream_buffer)
        if stream_buffer > config.MAX_STREAM_BUFFER:
            raise UsageError(
                f'invalid -stream-buffer "{args.stream_buffer}" (at most '
                f"{config.MAX_STREAM_BUFFER} bytes; 0 for the kernel's autotuning, or auto)"
            )
    cfg = Config(
        mode=args.mode,
        qmp=Path(args.qmp),
        tap=args.tap,
        dest_ip=dest_ip,
        vm_ip=vm_ip,
        drive_id=args.drive_id,
        shared_storage=args.shared_storage,
        copy_mode=args.copy_mode,
        early_ram=_bool("early-ram", args.early_ram),
        migration_timeout=_number("migration-timeout", args.migration_timeout),
        storage_sync_timeout=_number("storage-sync-timeout", args.storage_sync_timeout),
        qmp_timeout=_number("qmp-timeout", args.qmp_timeout),
        tunnel_hold=_number("tunnel-hold", args.tunnel_hold),
        tap_drain_timeout=_number("tap-drain-timeout", args.tap_drain_timeout),
        switchover_timeout=_number("switchover-timeout", args.switchover_timeout),
        dest_timeout=_number("dest-timeout", args.dest_timeout),
        plug_limit=int(_number("plug-limit", args.plug_limit, int)),
        stream_buffer=stream_buffer,
        downtime_limit_ms=int(_number("downtime-limit", args.downtime_limit, int)),
        nbd_port=nbd_port,
        migration_port=migration_port,
        source_ip=source_ip,
        listen_ip=listen_ip,
        tls=args.tls,
        tls_dir=Path(args.tls_dir),
    )
    tls.check_files(cfg)
    return cfg


class _Running:
    """The side being run, so the signal handler can ask it whether to cancel."""

    side: object = None


async def run(cfg: Config, progress: Progress, running: _Running | None = None) -> None:
    """Lock the VM, connect, run one side, always disconnect and unlock."""
    from .lock import VMLock
    from .qmp import Monitor

    running = running or _Running()
    mon = Monitor(cfg.qmp, cfg.qmp_timeout)
    # A wrong -qmp is told as such, not as "another katamaran" running on the same wrong
    # path (two smoke tests' CLI runs on /nonexistent/qmp.sock met in the lock under -n 2).
    mon.check_path()
    with VMLock(cfg.qmp) as lock:  # before connecting: a refused run touches nothing
        await mon.connect()
        progress.step(f"connected to QMP at {cfg.qmp} ({cfg.mode} mode)")
        try:
            # Each side imports only its own module: the source loads pyroute2 (slow to
            # import) while the disk is mirrored, the destination needs it at once.
            if cfg.mode == "source":
                from .source import SourceMigration

                running.side = SourceMigration(cfg, mon, progress, lock)
                await running.side.run()
            else:
                from .dest import DestMigration

                running.side = DestMigration(cfg, mon, progress, lock)
                await running.side.run()
        finally:
            await mon.close()


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def _run_interruptible(cfg: Config, progress: Progress) -> None:
    """SIGINT/SIGTERM/SIGHUP cancel the run (a dropped ssh session sends SIGHUP); its
    cleanup still runs to completion.  After the source's point of no return the run
    is not cancelled: the source keeps waiting for the outcome (see on_signal)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    caught: list[int] = []
    running = _Running()

    def interrupt(signum: int) -> None:
        if caught:
            return  # cleanup is already running; it finishes by itself
        name = signal.Signals(signum).name
        on_signal = getattr(running.side, "on_signal", None)
        if on_signal is not None and not on_signal(name):
            return
        caught.append(signum)
        progress.warn(f"{name}: aborting and cleaning up")
        task.cancel()

    for signum in SIGNALS:
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        await run(cfg, progress, running)
    except asyncio.CancelledError:
        if caught:
            phase = getattr(running.side, "where", None)
            where = f" {phase}" if phase is not None else ""
            raise Aborted(f"interrupted by {signal.Signals(caught[0]).name}{where}") from None
        raise


def _release_dead_streams() -> None:
    """Flush stdout/stderr now; one whose reader is gone (a dropped ssh session) is
    pointed at /dev/null.  Python flushes both again when it exits, and a failing flush
    there turns the exit code into 120 (seen in the fault suite instead of 130)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, stream.fileno())
                os.close(null)
            except (OSError, ValueError):
                pass  # closed: Python will not flush it again


def _say(text: str) -> None:
    """Write to stderr, never raise: `katamaran -mode bogus 2>&1 | true` must still exit 2
    (stderr is line-buffered, so a reader that is gone fails this very write)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # _release_dead_streams points it at /dev/null on the way out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    finally:
        _release_dead_streams()


def _main(argv: list[str]) -> int:
    progress = Progress()
    try:
        cfg = parse_args(argv)
        asyncio.run(_run_interruptible(cfg, progress))
    except UsageError as err:
        _say(f"katamaran: {err}\n{USAGE}\n")
        return err.exit_code
    except KatamaranError as err:
        progress.step(f"error: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        progress.step("error: interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
