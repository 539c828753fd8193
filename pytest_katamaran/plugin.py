"""pytest plugin: options, the two-node lab fixtures, continuous ping and per-test results.

Registered through the ``pytest11`` entry point ``katamaran``.  Modelled on
pytest-testinfra: this module holds options and fixtures, backends live under
``pytest_katamaran.backend`` and are chosen by ``--nodes``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from pytest_katamaran import backend as _backend
from pytest_katamaran.accel import ACCEL_CHOICES, Accel, AccelUnavailable, choose_accel
from pytest_katamaran.ping import PingMonitor, PingStats

NODES_OFF = "none"
IMAGE_CHOICES = ("debian", "ubuntu")
SKIP_REASON = "needs --nodes=qemu (the two-node QEMU lab); not given"
SERIAL_TAIL_LINES = 60

_CONFIG_KEY = pytest.StashKey["KatamaranConfig"]()
_NOTES_KEY = pytest.StashKey[list[str]]()
_FAILED_KEY = pytest.StashKey[list[str]]()
_BACKEND_KEY = pytest.StashKey[Any]()
_START_TAILS_KEY = pytest.StashKey[list[tuple[str, str]]]()
_REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


@dataclasses.dataclass(frozen=True)
class KatamaranConfig:
    """Options resolved once (command line wins over ini) and handed to fixtures and backends.

    ``accelerator`` is filled in (via ``dataclasses.replace``) by the ``nodes``
    fixture before the backend is built, so a backend can use
    ``config.accelerator.qemu_args()`` without probing KVM again.
    """

    nodes: str | None
    node_image: str
    accel: str
    keep_on_failure: bool
    ping_interval: float
    results_dir: Path
    rootdir: Path
    accelerator: Accel | None = None
    ping_interval_set: bool = True  # False: the 10 ms default, not the user's choice

    @classmethod
    def from_pytest(cls, config: pytest.Config) -> KatamaranConfig:
        """Resolve and validate; bad ini values become a usage error, not a test error."""
        nodes = _pick(config, "katamaran_nodes", "katamaran_nodes")
        if nodes in (None, NODES_OFF):
            nodes = None
        elif nodes not in _backend.BACKENDS:
            raise pytest.UsageError(
                f"katamaran: unknown nodes backend {nodes!r} (ini katamaran_nodes); "
                f"choose from: {', '.join(_backend.BACKENDS)}"
            )
        image = _pick(config, "katamaran_node_image", "katamaran_node_image") or "debian"
        if image not in IMAGE_CHOICES:
            raise pytest.UsageError(
                f"katamaran: unknown node image {image!r}; choose from: {', '.join(IMAGE_CHOICES)}"
            )
        accel = _pick(config, "katamaran_accel", "katamaran_accel") or "auto"
        if accel not in ACCEL_CHOICES:
            raise pytest.UsageError(
                f"katamaran: unknown accel {accel!r}; choose from: {', '.join(ACCEL_CHOICES)}"
            )
        keep = config.getoption("katamaran_keep_on_failure")
        if keep is None:
            keep = bool(config.getini("katamaran_keep_on_failure"))
        raw_interval = _pick(config, "katamaran_ping_interval", "katamaran_ping_interval")
        try:
            interval = float(raw_interval) if raw_interval not in (None, "") else 0.01
        except ValueError:
            raise pytest.UsageError(
                f"katamaran: ping interval must be a number of seconds, got {raw_interval!r}"
            ) from None
        if not interval > 0:
            raise pytest.UsageError(f"katamaran: ping interval must be > 0, got {interval}")
        results_cli = config.getoption("katamaran_results_dir")
        if results_cli is not None:
            results = Path(config.invocation_params.dir, results_cli)
        else:
            ini_results = config.getini("katamaran_results_dir") or "results"
            base = config.inipath.parent if config.inipath else config.rootpath
            results = Path(base, ini_results)
        return cls(
            nodes=nodes,
            node_image=image,
            accel=accel,
            keep_on_failure=keep,
            ping_interval=interval,
            results_dir=results.resolve(),
            rootdir=config.rootpath,
            ping_interval_set=raw_interval not in (None, ""),
        )


def _pick(config: pytest.Config, dest: str, ini: str) -> Any:
    """Command-line value if given, else the ini value (empty string means unset)."""
    value = config.getoption(dest)
    if value is not None:
        return value
    value = config.getini(ini)
    if isinstance(value, str):
        return value.strip() or None
    return value  # a native TOML value (pyproject) such as 0.05


# --------------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the katamaran options; each has an ini twin for pyproject/pytest.ini."""
    group = parser.getgroup("katamaran", "katamaran two-node live-migration lab")
    group.addoption(
        "--nodes",
        dest="katamaran_nodes",
        choices=(*_backend.BACKENDS, NODES_OFF),
        default=None,
        help="boot the two lab nodes with this backend (qemu); tests needing nodes "
        "are skipped without it. ini: katamaran_nodes",
    )
    group.addoption(
        "--node-image",
        dest="katamaran_node_image",
        choices=IMAGE_CHOICES,
        default=None,
        help="node OS: debian (built offline, default) or ubuntu (the guide's 22.04 "
        "cloud image, needs a download). ini: katamaran_node_image",
    )
    group.addoption(
        "--accel",
        dest="katamaran_accel",
        choices=ACCEL_CHOICES,
        default=None,
        help="QEMU accelerator: auto (KVM only if a probe boot works, else TCG), kvm, "
        "tcg. Default auto. ini: katamaran_accel",
    )
    group.addoption(
        "--keep-nodes-on-failure",
        dest="katamaran_keep_on_failure",
        action="store_true",
        default=None,
        help="leave the nodes running when a test using them failed, and print how "
        "to reach them. ini: katamaran_keep_on_failure",
    )
    group.addoption(
        "--ping-interval",
        dest="katamaran_ping_interval",
        default=None,
        metavar="SECONDS",
        help="interval of the continuous zero-drop ping (default 0.01; < 0.2 needs "
        "root on the pinging side). ini: katamaran_ping_interval",
    )
    group.addoption(
        "--results-dir",
        dest="katamaran_results_dir",
        default=None,
        metavar="DIR",
        help="where the results fixture writes one JSON file per test (default "
        "results). ini: katamaran_results_dir",
    )
    parser.addini("katamaran_nodes", "node backend (qemu), like --nodes", default="")
    parser.addini("katamaran_node_image", "node image (debian|ubuntu)", default="")
    parser.addini("katamaran_accel", "accelerator (auto|kvm|tcg)", default="")
    parser.addini("katamaran_keep_on_failure", "keep nodes running after a failure", type="bool")
    parser.addini("katamaran_ping_interval", "ping interval in seconds", default="")
    parser.addini("katamaran_results_dir", "results JSON directory", default="")


def pytest_configure(config: pytest.Config) -> None:
    """Resolve options once; an explicit --accel=kvm that cannot work is a usage error."""
    config.addinivalue_line("markers", "nodes: needs the two-node lab (--nodes=qemu)")
    cfg = KatamaranConfig.from_pytest(config)
    config.stash[_CONFIG_KEY] = cfg
    config.stash[_NOTES_KEY] = []
    config.stash[_FAILED_KEY] = []
    if cfg.nodes is not None and cfg.accel == "kvm":
        try:
            choose_accel("kvm")
        except AccelUnavailable as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show the resolved lab settings so a log says what was tested."""
    cfg = config.stash.get(_CONFIG_KEY, None)
    if cfg is None:
        return []
    return [
        f"katamaran: nodes={cfg.nodes or 'none'} image={cfg.node_image} accel={cfg.accel} "
        f"ping-interval={cfg.ping_interval:g}s results={cfg.results_dir}"
    ]


def _uses_nodes(item: pytest.Item) -> bool:
    return item.get_closest_marker("nodes") is not None or "nodes" in getattr(
        item, "fixturenames", ()
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip node tests up front, naming the missing prerequisite exactly."""
    if config.stash[_CONFIG_KEY].nodes is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _uses_nodes(item):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item; on failure attach the nodes' serial log tails."""
    rep = yield
    item.stash.setdefault(_REPORTS_KEY, {})[rep.when] = rep
    if rep.failed and _uses_nodes(item):
        item.config.stash[_FAILED_KEY].append(item.nodeid)
        if rep.when in ("setup", "call"):
            tails = item.config.stash.get(_START_TAILS_KEY, None)
            if tails is None:
                backend = item.config.stash.get(_BACKEND_KEY, None)
                tails = _serial_tails(backend) if backend is not None else []
            for title, text in tails:
                rep.sections.append((title, text))
    return rep


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Repeat katamaran notes (TCG fallback, kept nodes) where nobody can miss them."""
    notes = config.stash.get(_NOTES_KEY, [])
    if notes:
        terminalreporter.section("katamaran")
        for line in notes:
            terminalreporter.write_line(line)


def _announce(config: pytest.Config, line: str) -> None:
    """Print now (bypassing capture) and again in the terminal summary."""
    config.stash[_NOTES_KEY].append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else nullcontext()
    with ctx:
        reporter.ensure_newline()
        reporter.write_line(line, yellow=True)


# --------------------------------------------------------------------------- serial logs


def _serial_paths(backend: Any) -> list[tuple[str, Path]]:
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


def _tail_lines(path: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _serial_tails(backend: Any) -> list[tuple[str, str]]:
    return [
        (
            f"katamaran serial log {name} (last {SERIAL_TAIL_LINES} lines of {path})",
            _tail_lines(path),
        )
        for name, path in _serial_paths(backend)
    ]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def katamaran_config(pytestconfig: pytest.Config) -> KatamaranConfig:
    """The resolved katamaran options."""
    return pytestconfig.stash[_CONFIG_KEY]


@pytest.fixture(scope="session")
def accelerator(pytestconfig: pytest.Config, katamaran_config: KatamaranConfig) -> Accel:
    """KVM if a real probe boot works (or was forced), else TCG, with a visible note."""
    try:
        accel = choose_accel(katamaran_config.accel)
    except AccelUnavailable as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    if accel.fell_back:
        _announce(pytestconfig, accel.note)
    return accel


class _TermAsInterrupt:
    """Turn SIGTERM into KeyboardInterrupt while nodes run, so teardown still stops them.

    Only in this process: a forked child inherits the handler (pyroute2's netns.create
    forks a helper and stops it with SIGTERM), and raising there would run pytest's
    teardown, node shutdown included, inside the child.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.installed = False
        self.owner = os.getpid()

    def __enter__(self) -> _TermAsInterrupt:
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


def _stop_backend(backend: Any) -> None:
    """Stop, retrying once if a second Ctrl-C lands in the middle of stopping."""
    try:
        backend.stop()
    except KeyboardInterrupt:
        backend.stop()


def _keep_message(backend: Any, failed: list[str]) -> list[str]:
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


@pytest.fixture(scope="session")
def nodes(
    request: pytest.FixtureRequest,
    pytestconfig: pytest.Config,
    katamaran_config: KatamaranConfig,
    accelerator: Accel,
) -> Generator[Any, None, None]:
    """Boot the two lab nodes for the session; always stopped (unless kept after a failure)."""
    if katamaran_config.nodes is None:
        pytest.skip(SKIP_REASON)
    cfg = dataclasses.replace(katamaran_config, accelerator=accelerator)
    backend = _backend.get_backend(katamaran_config.nodes, cfg)
    pytestconfig.stash[_BACKEND_KEY] = backend
    keep = False
    with _TermAsInterrupt():
        try:
            try:
                backend.start()
            except BaseException:
                # Capture the consoles before stop() may delete them: they explain the failure.
                pytestconfig.stash[_START_TAILS_KEY] = _serial_tails(backend)
                raise
            yield backend
            failed = pytestconfig.stash[_FAILED_KEY]
            # Ctrl-C / SIGTERM: wrap_session sets INTERRUPTED before tearing fixtures down.
            interrupted = request.session.exitstatus == pytest.ExitCode.INTERRUPTED
            keep = katamaran_config.keep_on_failure and bool(failed) and not interrupted
            if keep:
                for line in _keep_message(backend, failed):
                    _announce(pytestconfig, line)
        finally:
            if not keep:
                _stop_backend(backend)
            pytestconfig.stash[_BACKEND_KEY] = None


@pytest.fixture(scope="session")
def node_a(nodes: Any) -> Any:
    """Node A, the migration source (private IP 10.0.0.1)."""
    return nodes.node_a


@pytest.fixture(scope="session")
def node_b(nodes: Any) -> Any:
    """Node B, the migration destination (private IP 10.0.0.2)."""
    return nodes.node_b


@pytest.fixture
def ping(katamaran_config: KatamaranConfig) -> Generator[Callable[..., PingMonitor], None, None]:
    """Factory: ``ping(node, target_ip, interval=None)`` starts a background ping.

    ``node=None`` pings from this host.  Every monitor still running is stopped
    at teardown, so a failing test never leaves ping processes behind.
    """
    monitors: list[PingMonitor] = []

    def start(node: Any, target_ip: str, interval: float | None = None) -> PingMonitor:
        every = interval if interval is not None else katamaran_config.ping_interval
        if node is None:
            monitor = PingMonitor.local(target_ip, every)
        else:
            monitor = PingMonitor.on_node(node, target_ip, every)
        monitors.append(monitor)
        return monitor.start()

    yield start
    problems = []
    for monitor in monitors:
        try:
            if monitor.handle is not None:
                monitor.stop()
        except Exception as exc:
            problems.append(f"{monitor.name}: {exc}")
    if problems:
        warnings.warn(
            pytest.PytestWarning("katamaran: could not stop ping: " + "; ".join(problems)),
            stacklevel=1,
        )


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
    reports = request.node.stash.get(_REPORTS_KEY, {})
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
        },
        "results": data,
    }
    out_dir = katamaran_config.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_sanitize(request.node.nodeid)}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
