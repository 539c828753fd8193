"""pytest plugin: options and hooks.  Fixtures live in ``fixtures.py`` (registered here).

Registered through the ``pytest11`` entry point ``katamaran``.  Laid out like
pytest-django: this module holds options and hooks, ``fixtures.py`` the public fixtures,
``config.py`` the resolved options; node backends live under ``pytest_katamaran.backend``
and are chosen by ``--nodes``.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_katamaran import backend as _backend
from pytest_katamaran.config import (
    IMAGE_CHOICES,
    KATA_CHOICES,
    NODES_OFF,
    TUNABLES,
    KatamaranConfig,
)
from pytest_katamaran.fixtures import *  # noqa: F403  (the public fixtures)
from pytest_katamaran.pluginstate import (
    BACKEND_KEY,
    CONFIG_KEY,
    FAILED_KEY,
    MIGRATIONS_KEY,
    NOTES_KEY,
    PINGS_KEY,
    REPORTS_KEY,
    SKIP_REASON,
    START_TAILS_KEY,
    serial_tails,
    timeline_lines,
)
from pytest_katamaran.qemu.accel import ACCEL_CHOICES, AccelUnavailable, choose_accel
from pytest_katamaran.qemu.binary import WORKLOAD_QEMU_CHOICES

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
    group.addoption(
        "--kata",
        dest="katamaran_kata",
        choices=KATA_CHOICES,
        default=None,
        help="what kata_pod starts: sandbox (the Kata-shaped sandbox the offline nodes "
        "can run), runtime (a real Kata container through containerd; skipped when the "
        "node has neither kata-runtime nor containerd-shim-kata-v2), auto (runtime where "
        "the node has Kata, else sandbox; default). ini: katamaran_kata",
    )
    group.addoption(
        "--workload-qemu",
        dest="katamaran_workload_qemu",
        choices=WORKLOAD_QEMU_CHOICES,
        default=None,
        help="QEMU of the pods: backports (Debian backports' QEMU, unpacked into the "
        "cache: 7.2 corrupts a TCG guest during migration; default) or system. "
        "ini: katamaran_workload_qemu",
    )
    group.addoption(
        "--pod-accel",
        dest="katamaran_pod_accel",
        choices=ACCEL_CHOICES,
        default=None,
        help="accelerator of the pods' QEMU on the nodes: auto (default: KVM where the "
        "node really runs a vCPU with it, else TCG; a TCG node's emulated AMD CPU offers "
        "SVM, so its pods run under the node's KVM, about 20x faster, and the node gets "
        "one vCPU, see --node-cpus), kvm, tcg (the pod translated twice in a TCG node: "
        "pinged at a probed pace). ini: katamaran_pod_accel",
    )
    parser.addini("katamaran_kata", "kata_pod mode (auto|sandbox|runtime)", default="")
    parser.addini("katamaran_pod_accel", "pods' accelerator (auto|kvm|tcg)", default="")
    parser.addini("katamaran_workload_qemu", "pods' QEMU (backports|system)", default="")
    for t in TUNABLES:
        group.addoption(
            t.option,
            dest=t.ini,
            default=None,
            metavar="N" if t.integer else "SECONDS",
            help=f"{t.help}. ini: {t.ini}",
        )
        parser.addini(t.ini, t.help.split(". ")[0], default="")


def pytest_configure(config: pytest.Config) -> None:
    """Resolve options once; an explicit --accel=kvm that cannot work is a usage error."""
    config.addinivalue_line("markers", "nodes: needs the two-node lab (--nodes=qemu)")
    cfg = KatamaranConfig.from_pytest(config)
    config.stash[CONFIG_KEY] = cfg
    config.stash[NOTES_KEY] = []
    config.stash[FAILED_KEY] = []
    if cfg.nodes is not None and cfg.accel == "kvm":
        try:
            choose_accel("kvm")
        except AccelUnavailable as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show the resolved lab settings so a log says what was tested."""
    cfg = config.stash.get(CONFIG_KEY, None)
    if cfg is None:
        return []
    t = cfg.tuning
    return [
        f"katamaran: nodes={cfg.nodes or 'none'} image={cfg.node_image} accel={cfg.accel} "
        f"ping-interval={cfg.ping_interval:g}s results={cfg.results_dir}",
        f"katamaran: kata={cfg.kata} workload-qemu={cfg.workload_qemu} pod-accel={cfg.pod_accel} "
        f"tunnel-hold={t.tunnel_hold:g}s dest-hold={t.dest_hold_s:g}s "
        f"converge-delay={t.converge_delay:g}s writer-rate={t.writer_rate}/s "
        f"tap-drain={t.tap_drain:g}s max-pause={t.max_pause:g}s "
        f"node-cpus={t.node_cpus or 'auto'} "
        f"nested-tcg-ping-interval={t.nested_tcg_ping_interval:g}s "
        f"nested-tcg-ping-headroom={t.nested_tcg_ping_headroom:g}",
    ]


def _uses_nodes(item: pytest.Item) -> bool:
    return item.get_closest_marker("nodes") is not None or "nodes" in getattr(
        item, "fixturenames", ()
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip node tests up front, naming the missing prerequisite exactly."""
    if config.stash[CONFIG_KEY].nodes is not None:
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
    item.stash.setdefault(REPORTS_KEY, {})[rep.when] = rep
    if rep.failed and _uses_nodes(item):
        item.config.stash[FAILED_KEY].append(item.nodeid)
        if rep.when in ("setup", "call"):
            tails = item.config.stash.get(START_TAILS_KEY, None)
            if tails is None:
                backend = item.config.stash.get(BACKEND_KEY, None)
                tails = serial_tails(backend) if backend is not None else []
            for title, text in tails:
                rep.sections.append((title, text))
        if rep.when == "call":
            rep.sections.extend(_migration_sections(item))
    return rep


def _migration_sections(item: pytest.Item) -> list[tuple[str, str]]:
    """For a failed test that migrated: each migration explained, with the evidence.

    Gathered now, between the test body and the fixtures' teardown, while the pods and
    katamaran's leftovers (if any) still exist: logs, consoles, VM status, drop counters,
    serial tails, and every lost ping of the test's pings placed against STOP/RESUME.
    """
    sections = []
    monitors = item.stash.get(PINGS_KEY, [])
    for i, res in enumerate(item.stash.get(MIGRATIONS_KEY, []), 1):
        try:
            res.gather()
            pings = [m for m in monitors if res.pod is None or m.target == res.pod.ip]
            text = res.explain(pings[0] if pings else None)
        except Exception as exc:  # a diagnostic must never hide the failure itself
            text = f"(diagnostics unavailable: {type(exc).__name__}: {exc})"
        title = f"katamaran migration {i}: {res.source_node} -> {res.dest_node}"
        sections.append((title, text))
    return sections


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Repeat katamaran notes (TCG fallback, kept nodes) where nobody can miss them, and
    name every migration's timeline picture (a drawing failure is a warning line here)."""
    lines = [*config.stash.get(NOTES_KEY, []), *timeline_lines(terminalreporter)]
    if lines:
        terminalreporter.section("katamaran")
        for line in lines:
            terminalreporter.write_line(line, yellow=line.startswith("WARNING"))
