"""What the plugin's hooks and fixtures share: stash keys, notes, serial tails, signals,
timeline lines.

Why apart from both: ``plugin.py`` (hooks, options) and ``fixtures.py`` (resources) each
need these, and neither should import the other's internals.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_katamaran.config import KatamaranConfig
from pytest_katamaran.logtail import tail

if TYPE_CHECKING:
    from pytest_katamaran.checks.ping import PingMonitor
    from pytest_katamaran.migration import MigrationResult

SKIP_REASON = "needs --nodes=qemu (the two-node QEMU lab); not given"
SERIAL_TAIL_LINES = 60

CONFIG_KEY = pytest.StashKey[KatamaranConfig]()
NOTES_KEY = pytest.StashKey[list[str]]()
FAILED_KEY = pytest.StashKey[list[str]]()
BACKEND_KEY = pytest.StashKey[Any]()
START_TAILS_KEY = pytest.StashKey[list[tuple[str, str]]]()
REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
MIGRATIONS_KEY = pytest.StashKey[list["MigrationResult"]]()
PINGS_KEY = pytest.StashKey[list["PingMonitor"]]()
# user_properties names that carry a timeline picture (or why none) from the test's
# teardown report to the terminal summary, also from an xdist worker to the controller.
TIMELINE_PROPERTY = "katamaran_timeline"
TIMELINE_WARNING_PROPERTY = "katamaran_timeline_warning"


def announce(config: pytest.Config, line: str) -> None:
    """Print now (bypassing capture) and again in the terminal summary."""
    config.stash[NOTES_KEY].append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else nullcontext()
    with ctx:
        reporter.ensure_newline()
        reporter.write_line(line, yellow=True)


def call_failed(item: pytest.Item) -> bool:
    """Whether the test body of ``item`` failed (finalizers decide what to keep on it)."""
    rep = item.stash.get(REPORTS_KEY, {}).get("call")
    return rep is not None and rep.failed


# --------------------------------------------------------------------------- serial logs


def serial_paths(backend: Any) -> list[tuple[str, Path]]:
    """Normalise ``backend.serial_logs()`` (mapping or iterable) to (name, path) pairs."""
    logs: Any = None
    try:
        logs = backend.serial_logs()
    except Exception:  # a broken backend must not hide the test failure
        logs = None
    pairs: list[tuple[str, Path]] = []
    if isinstance(logs, Mapping):
        pairs = [(str(k), Path(v)) for k, v in logs.items()]
    elif isinstance(logs, Iterable) and not isinstance(logs, str | bytes):
        for entry in logs:
            if isinstance(entry, tuple) and len(entry) == 2:
                pairs.append((str(entry[0]), Path(entry[1])))
            else:
                pairs.append((Path(entry).stem, Path(entry)))
    if not pairs:
        for attr in ("node_a", "node_b"):
            try:
                node = getattr(backend, attr)
                pairs.append((node.name, Path(node.serial_log)))
            except Exception:
                continue
    return pairs


def serial_tails(backend: Any) -> list[tuple[str, str]]:
    """(section title, last lines) of every node's serial log."""
    return [
        (
            f"katamaran serial log {name} (last {SERIAL_TAIL_LINES} lines of {path})",
            tail(path, SERIAL_TAIL_LINES),
        )
        for name, path in serial_paths(backend)
    ]


# --------------------------------------------------------------------------- node lifetime


class TermAsInterrupt:
    """Turn SIGTERM into KeyboardInterrupt while nodes run, so teardown still stops them.

    Only in this process: a forked child inherits the handler (pyroute2's netns.create
    forks a helper and stops it with SIGTERM), and raising there would run pytest's
    teardown, node shutdown included, inside the child.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.installed = False
        self.owner = os.getpid()

    def __enter__(self) -> TermAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.owner = os.getpid()
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            self.installed = True
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner:  # a forked child: die as SIGTERM would kill it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)


def stop_backend(backend: Any) -> None:
    """Stop, retrying once if a second Ctrl-C lands in the middle of stopping."""
    try:
        backend.stop()
    except KeyboardInterrupt:
        backend.stop()


def keep_message(backend: Any, failed: list[str]) -> list[str]:
    """How to reach the nodes that --keep-nodes-on-failure left running."""
    lines = [
        "katamaran: --keep-nodes-on-failure: nodes left running after failure of "
        + ", ".join(failed[:5])
        + (" ..." if len(failed) > 5 else "")
    ]
    for attr in ("node_a", "node_b"):
        try:
            node = getattr(backend, attr)
        except Exception:
            continue
        ssh = getattr(node, "ssh", None)
        reach = ssh.ssh_command() if hasattr(ssh, "ssh_command") else f"port {node.ssh_port}"
        lines.append(f"  {node.name} ({node.private_ip}): {reach}  serial log: {node.serial_log}")
    extra = getattr(backend, "keep_instructions", None)
    if callable(extra):
        lines.extend(f"  {ln}" for ln in str(extra()).splitlines())
    return lines


def timeline_lines(terminalreporter: Any) -> list[str]:
    """Each test's timeline picture, or why it was not drawn, from the teardown reports.

    The results fixture leaves them as user properties of the teardown report, so they
    reach the terminal from an xdist worker too.
    """
    found: list[tuple[str, str]] = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) != "teardown":
                continue
            for name, value in getattr(rep, "user_properties", ()):
                if name == TIMELINE_PROPERTY:
                    found.append((rep.nodeid, f"timeline: {value}"))
                elif name == TIMELINE_WARNING_PROPERTY:
                    found.append((rep.nodeid, f"WARNING: no timeline for {rep.nodeid}: {value}"))
    return [line for _, line in sorted(found)]
