"""Every public fixture of the plugin; ``pytest --fixtures`` shows their docstrings.

Each fixture is small: it takes a resource class from its own module (nodes from
``backend``, pods from ``pod``, migrations from ``migration``, pings from ``ping``), ties
its lifetime to the test or the session, and cleans up on every path (failure, error,
Ctrl-C/SIGTERM).  Override any of them in a conftest.py by defining a fixture of the
same name (for example ``guest_image`` with your own kernel and initrd).

Registered from ``plugin.py`` (``from pytest_katamaran.fixtures import *``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_katamaran import backend as _backend
from pytest_katamaran.checks.pace import pace
from pytest_katamaran.checks.ping import PingMonitor, PingStats
from pytest_katamaran.config import KatamaranConfig
from pytest_katamaran.errors import KataUnavailable, RuntimeNotImplemented
from pytest_katamaran.migration import MigrationResult, Migrator
from pytest_katamaran.pluginstate import (
    BACKEND_KEY,
    CONFIG_KEY,
    FAILED_KEY,
    MIGRATIONS_KEY,
    PINGS_KEY,
    REPORTS_KEY,
    SKIP_REASON,
    START_TAILS_KEY,
    TIMELINE_PROPERTY,
    TIMELINE_WARNING_PROPERTY,
    TermAsInterrupt,
    announce,
    call_failed,
    keep_message,
    serial_tails,
    stop_backend,
)
from pytest_katamaran.pod import KataPod, PodLab
from pytest_katamaran.qemu.accel import Accel, AccelUnavailable, choose_accel

__all__ = [
    "accelerator",
    "guest_image",
    "kata_pod",
    "katamaran_config",
    "katamaran_pods",
    "migrate",
    "node_a",
    "node_b",
    "nodes",
    "ping",
    "results",
    "workload_qemu",
]


# --------------------------------------------------------------------------- session


@pytest.fixture(scope="session")
def katamaran_config(pytestconfig: pytest.Config) -> KatamaranConfig:
    """The resolved katamaran options (command line over ini), one frozen object.
    ``.tuning`` holds the migration flow's numbers (``--tunnel-hold``, ``--dest-hold``,
    ``--converge-delay``, ``--writer-rate``, ``--tap-drain``, ``--max-pause``,
    ``--nested-tcg-ping-interval``; ini ``katamaran_<name>``).
    """
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def accelerator(pytestconfig: pytest.Config, katamaran_config: KatamaranConfig) -> Accel:
    """KVM if a real probe boot works (or was forced), else TCG, with a visible note."""
    try:
        accel = choose_accel(katamaran_config.accel)
    except AccelUnavailable as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    if accel.fell_back:
        announce(pytestconfig, accel.note)
    return accel


@pytest.fixture(scope="session")
def nodes(
    request: pytest.FixtureRequest,
    pytestconfig: pytest.Config,
    katamaran_config: KatamaranConfig,
    accelerator: Accel,
) -> Generator[Any, None, None]:
    """Boot the two lab nodes for the session (``--nodes=qemu``); always stopped.
    Skipped without ``--nodes``.  Kept running after a failure only with
    ``--keep-nodes-on-failure`` (and never after Ctrl-C/SIGTERM); their serial log tails
    are attached to every failing test that used them.
    """
    if katamaran_config.nodes is None:
        pytest.skip(SKIP_REASON)
    cfg = dataclasses.replace(katamaran_config, accelerator=accelerator)
    backend = _backend.get_backend(katamaran_config.nodes, cfg)
    pytestconfig.stash[BACKEND_KEY] = backend
    keep = False
    with TermAsInterrupt():
        try:
            try:
                backend.start()
            except BaseException:
                # Capture the consoles before stop() may delete them: they explain the failure.
                pytestconfig.stash[START_TAILS_KEY] = serial_tails(backend)
                raise
            yield backend
            failed = pytestconfig.stash[FAILED_KEY]
            # Ctrl-C / SIGTERM: wrap_session sets INTERRUPTED before tearing fixtures down.
            interrupted = request.session.exitstatus == pytest.ExitCode.INTERRUPTED
            keep = katamaran_config.keep_on_failure and bool(failed) and not interrupted
            if keep:
                for line in keep_message(backend, failed):
                    announce(pytestconfig, line)
        finally:
            if not keep:
                stop_backend(backend)
            pytestconfig.stash[BACKEND_KEY] = None


@pytest.fixture(scope="session")
def node_a(nodes: Any) -> Any:
    """Node A, the migration source (private IP 10.0.0.1):
    ``.name``, ``.private_ip``, ``.serial_log``, ``.ssh`` (``run/sudo/start/put/get``).
    """
    return nodes.node_a


@pytest.fixture(scope="session")
def node_b(nodes: Any) -> Any:
    """Node B, the migration destination (private IP 10.0.0.2); see ``node_a``."""
    return nodes.node_b


@pytest.fixture(scope="session")
def guest_image() -> Any:
    """The pod's guest: Debian's cloud kernel + a busybox initramfs with the disk writer.
    Built on this host once (cached by recipe hash); the nodes see it through the host
    root.  Override it to run your own guest (``.kernel``, ``.initrd``).
    """
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    from pytest_katamaran.images.guest import build_guest

    return build_guest()


@pytest.fixture(scope="session")
def workload_qemu(katamaran_config: KatamaranConfig) -> Any:
    """The QEMU the pods run on both nodes (``--workload-qemu=backports|system``).
    ``backports`` (default): Debian backports' QEMU, unpacked into the cache, because
    Debian 12's 7.2 corrupts a TCG guest's RAM during live migration; falls back to the
    system QEMU with a warning when the archive cannot be reached.
    """
    from pytest_katamaran.images.guest import cache_root
    from pytest_katamaran.qemu.binary import workload_qemu as choose

    qemu, note = choose(katamaran_config.workload_qemu, cache_root())
    if note:
        warnings.warn(pytest.PytestWarning(note), stacklevel=1)
    return qemu


# --------------------------------------------------------------------------- pods


@pytest.fixture
def katamaran_pods(
    request: pytest.FixtureRequest, katamaran_config: KatamaranConfig, nodes: Any, tmp_path: Path
) -> Generator[PodLab, None, None]:
    """The pods, node agents and shared exports of this test (what ``kata_pod`` and
    ``migrate`` share); at teardown everything they started is stopped on every node
    touched (``nodeside stop --purge``: VMs by PID, netns, veth, tap, routes, NBD, disks)
    and the host's NBD exports are stopped.  With ``--keep-nodes-on-failure`` a failed
    test's pods are left for inspection.
    """
    lab = PodLab(
        kata=katamaran_config.kata,
        writer_rate=katamaran_config.tuning.writer_rate,
        guest=lambda: request.getfixturevalue("guest_image"),
        workload_qemu=lambda: request.getfixturevalue("workload_qemu"),
        workdir=tmp_path,
        pod_accel=katamaran_config.pod_accel,
    )
    yield lab
    if katamaran_config.keep_on_failure and call_failed(request.node):
        return  # --keep-nodes-on-failure: leave the workload for inspection too
    problems = lab.cleanup()
    if problems:
        warnings.warn(
            pytest.PytestWarning("katamaran: pod cleanup failed: " + "; ".join(problems)),
            stacklevel=1,
        )


@pytest.fixture
def kata_pod(katamaran_pods: PodLab) -> Callable[..., KataPod]:
    """Factory: ``kata_pod(node, shared_storage=False, **options)`` starts a Kata pod.
    Returns a ``KataPod`` once its guest is up: ``.ip`` (10.244.1.5 unless ``ip=``),
    ``.node``, ``.qmp_socket``, ``.tap``, ``.drive_id``, ``.disk``; ``.console()``,
    ``.acked_writes()``, ``.verify_writes()`` (stops it, checks every acknowledged disk
    write is on its disk).  ``shared_storage=True`` puts its disk on a qemu-nbd export of
    this host that both nodes map as /dev/nbd0.  Options: ``ip``, ``memory`` (MiB),
    ``disk_size``, ``writer`` (default True), ``writer_rate``, ``tcfilter``,
    ``boot_timeout``, ``accel`` (``auto``/``kvm``/``tcg``: its QEMU's accelerator on the
    node, default ``--pod-accel``; ``.accel`` says which it got).  One pod per node per test.
    ``--kata=sandbox`` runs the Kata-shaped sandbox (pod netns, Calico veth, Kata's
    tcfilter, QEMU laid out as Kata's); ``--kata=runtime`` a real Kata container through
    containerd, skipped naming ``kata-runtime``/``containerd-shim-kata-v2`` when the node
    has neither; ``auto`` (default) picks by what the node has.  Stopped at teardown.
    """

    def start(node: Any, shared_storage: bool = False, **options: Any) -> KataPod:
        try:
            return katamaran_pods.start(node, shared_storage=shared_storage, **options)
        except (KataUnavailable, RuntimeNotImplemented) as exc:
            pytest.skip(str(exc))

    return start


@pytest.fixture
def migrate(
    request: pytest.FixtureRequest,
    katamaran_pods: PodLab,
    katamaran_config: KatamaranConfig,
    accelerator: Accel,
) -> Generator[Callable[..., MigrationResult], None, None]:
    """Factory: ``migrate(pod, to=node, dest_flags=None, **katamaran_flags)`` moves a pod.
    Runs the guide's flow: the destination QEMU on ``to`` from the pod's own command line
    with ``-incoming defer``, ``katamaran -mode dest`` there, ``-mode source`` on the
    pod's node (``-shared-storage`` when the pod's disk is shared), then the CNI
    convergence step while the tunnel holds.  Keyword flags go to the source's command
    line (``tap_drain_timeout=10`` -> ``-tap-drain-timeout 10``), ``dest_flags`` to the
    destination's; holds and delays come from ``katamaran_config.tuning``.
    Returns a ``MigrationResult``: ``.ok``, ``.problems``, ``.total_s``,
    ``.downtime_ms``, ``.source_rc``, ``.dest_rc``, ``.source_log``, ``.dest_log``,
    ``.pod`` (the pod on ``to``), ``.hold_end``; ``assert result.ok, result.explain()``.
    A failing test that migrated gets the logs, consoles, drop counters and lost-ping
    placement attached to its report.
    """
    # the fastest a test may ping its pod, whatever its accelerator (the plug is sized for it)
    interval = min(katamaran_config.pod_ping_interval(a, accelerator) for a in ("kvm", "tcg"))
    migrator = Migrator(katamaran_pods, katamaran_config.tuning, interval)
    request.node.stash[MIGRATIONS_KEY] = migrator.results
    yield migrator.migrate
    migrator.cleanup()


# --------------------------------------------------------------------------- checks


@pytest.fixture
def ping(
    request: pytest.FixtureRequest, katamaran_config: KatamaranConfig
) -> Generator[Callable[..., PingMonitor], None, None]:
    """Factory: ``ping(node, target, interval=None, source=None)`` starts a background ping.
    ``target`` is an IP or a ``KataPod``.  From a node, ping leaves from the node's
    cluster address (``-I node.private_ip``), as a client elsewhere in the cluster would:
    left to itself, node A's kernel would pick the pod link's 169.254.1.1 (or the NAT
    NIC's 10.0.2.15, identical on both nodes), which node B answers locally once the pod
    lives there.  ``source=""`` lets the kernel choose.  ``node=None`` pings from this
    host.  The interval is ``--ping-interval``; towards a ``KataPod`` under nested TCG (a
    TCG pod in TCG nodes) without ``--ping-interval`` it is
    ``--nested-tcg-ping-interval``, or slower if the pod cannot answer that many: the pod
    is probed first (pytest_katamaran.checks.pace), pinged at
    ``--nested-tcg-ping-headroom`` times the interval it kept up with, and the choice is
    written in the ping's notes.  ``.wait_replies(n)``,
    ``.finish()`` / ``.stop()`` give the stats for ``assert_zero_drop``.  Every monitor
    still running is stopped at teardown; in a test using ``results`` its raw output is
    kept as ``<results-dir>/<test>.ping<N>.txt``.
    """
    monitors: list[PingMonitor] = []
    request.node.stash[PINGS_KEY] = monitors

    def start(
        node: Any, target: Any, interval: float | None = None, source: str | None = None
    ) -> PingMonitor:
        ip = target.ip if isinstance(target, KataPod) else str(target)
        src = getattr(node, "private_ip", None) if source is None else source

        def monitor(every: float, more: Sequence[str] = ()) -> PingMonitor:
            if node is None:
                return PingMonitor.local(ip, every, extra_args=more)
            extra = ("-I", src, *more) if src else tuple(more)
            name = f"ping {ip} from {node.name}" + (f" ({src})" if src else "")
            return PingMonitor(node.ssh, ip, every, name=name, extra_args=extra)

        ready = 10.0 if node is None else 60.0
        every, notes = interval, []
        if every is None and isinstance(target, KataPod):
            nodes_accel = request.getfixturevalue("accelerator")
            every = katamaran_config.pod_ping_interval(target.accel, nodes_accel)
            if katamaran_config.paces_pod_ping(target.accel, nodes_accel):  # nested TCG: measured
                headroom = katamaran_config.tuning.nested_tcg_ping_headroom
                paced = pace(
                    lambda i, more: monitor(i, more).start(ready_timeout=ready), every, headroom
                )
                every, notes = paced.interval, [paced.describe()]
        if every is None:
            every = katamaran_config.ping_interval
        started = monitor(every)
        started.setup_notes.extend(notes)
        return _started(monitors, started, ready)

    yield start
    problems = []
    for monitor in monitors:
        try:
            if monitor.handle is not None and monitor.stats is None:
                monitor.stop()
        except Exception as exc:
            problems.append(f"{monitor.name}: {exc}")
    if "results" in request.fixturenames:  # the raw evidence, next to the results JSON
        out_dir = katamaran_config.results_dir
        for i, monitor in enumerate(monitors, 1):
            out_dir.mkdir(parents=True, exist_ok=True)
            raw = out_dir / f"{_sanitize(request.node.nodeid)}.ping{i}.txt"
            raw.write_text(monitor.output())
    if problems:
        warnings.warn(
            pytest.PytestWarning("katamaran: could not stop ping: " + "; ".join(problems)),
            stacklevel=1,
        )


def _started(monitors: list[PingMonitor], monitor: PingMonitor, ready: float) -> PingMonitor:
    monitors.append(monitor)
    return monitor.start(ready_timeout=ready)


def _sanitize(nodeid: str) -> str:
    """A filesystem-safe, still readable file stem for a test id."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", nodeid).strip("_.") or "test"
    if len(stem) > 150:
        digest = hashlib.sha1(nodeid.encode()).hexdigest()[:10]
        stem = f"{stem[:139]}-{digest}"
    return stem


def _outcome(reports: Mapping[str, pytest.TestReport]) -> str:
    setup, call = reports.get("setup"), reports.get("call")
    if setup is not None and setup.failed:
        return "error"
    if setup is not None and setup.skipped:
        return "skipped"
    if call is None:
        return "error"
    if hasattr(call, "wasxfail"):
        return "xfailed" if call.skipped else "xpassed"
    return call.outcome


def _json_default(obj: Any) -> Any:
    if isinstance(obj, PingStats) or hasattr(obj, "as_dict"):
        return obj.as_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    return repr(obj)


@pytest.fixture
def results(
    request: pytest.FixtureRequest, katamaran_config: KatamaranConfig
) -> Generator[dict[str, Any], None, None]:
    """A dict the test fills; written to ``<results-dir>/<nodeid>.json`` with the outcome."""
    data: dict[str, Any] = {}
    started = _dt.datetime.now(_dt.timezone.utc)
    yield data
    if "after_resume" not in data:  # the migrated VM's first reply and its catch-up
        from pytest_katamaran.timeline import after_resume_figures

        figures = after_resume_figures(data)
        if figures is not None:
            data["after_resume"] = figures
    reports = request.node.stash.get(REPORTS_KEY, {})
    call = reports.get("call")
    failure = None
    for rep in reports.values():
        if rep.failed:
            failure = rep.longreprtext[-4000:]
            break
    payload = {
        "nodeid": request.node.nodeid,
        "outcome": _outcome(reports),
        "duration_s": round(call.duration, 3) if call is not None else None,
        "started_at": started.isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "failure": failure,
        "katamaran": {
            "nodes": katamaran_config.nodes,
            "node_image": katamaran_config.node_image,
            "accel": katamaran_config.accel,
            "ping_interval": katamaran_config.ping_interval,
            # what this test's pings really used (the TCG fallback differs from the option)
            "ping_intervals_used": [m.interval for m in request.node.stash.get(PINGS_KEY, [])],
            # each ping's socket receive buffer (None: left at iputils' own, see notes)
            "ping_rcvbufs": [m.rcvbuf for m in request.node.stash.get(PINGS_KEY, [])],
            "kata": katamaran_config.kata,
            "workload_qemu": katamaran_config.workload_qemu,
            "pod_accel": katamaran_config.pod_accel,
            "tuning": dataclasses.asdict(katamaran_config.tuning),
        },
        "results": data,
    }
    out_dir = katamaran_config.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_sanitize(request.node.nodeid)}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    _draw_timeline(request, data, path)


def _draw_timeline(request: pytest.FixtureRequest, data: Mapping[str, Any], path: Path) -> None:
    """``<stem>.timeline.png`` next to the JSON when the results carry a migration and a ping.

    Without ``results["ping"]`` (a test that failed before finishing its ping) the
    test's first ping so far is drawn: a failed migration's picture matters most.  Any
    drawing failure becomes a warning line in the terminal summary, never a failure.
    The outcome travels as a user property of the teardown report (xdist-safe).
    """
    if "migration" not in data:
        return
    stats = data.get("ping")
    if not isinstance(stats, PingStats):
        started = [m for m in request.node.stash.get(PINGS_KEY, []) if m.handle is not None]
        stats = (started[0].stats or started[0].snapshot()) if started else None
    if stats is None:
        return
    from pytest_katamaran.timeline import draw_results, timeline_path

    out = timeline_path(path)
    try:
        drawn = draw_results(data, request.node.nodeid, out, ping=stats)
    except Exception as exc:  # a picture must never fail the test it illustrates
        reason = f"{type(exc).__name__}: {exc}"
        request.node.user_properties.append((TIMELINE_WARNING_PROPERTY, f"{out}: {reason}"))
        return
    if drawn is not None:
        request.node.user_properties.append((TIMELINE_PROPERTY, str(drawn)))
