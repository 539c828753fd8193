"""The plugin's configuration: every option resolved once (command line wins over ini).

Why a module of its own: ``plugin.py`` registers options and hooks, ``fixtures.py``
hands resources to tests; both read this one frozen object, so a fixture never parses
an option itself.  The e2e tuning (tunnel hold, converge delay, writer rate, ...) lives
here as :data:`TUNABLES`, each a ``--<name>`` option with an ini key ``katamaran_<name>``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pytest_katamaran import backend as _backend
from pytest_katamaran.checks.pace import E2E_HEADROOM
from pytest_katamaran.qemu.accel import ACCEL_CHOICES, Accel
from pytest_katamaran.qemu.binary import WORKLOAD_QEMU_CHOICES

NODES_OFF = "none"
IMAGE_CHOICES = ("debian", "ubuntu")
KATA_CHOICES = ("auto", "sandbox", "runtime")


@dataclasses.dataclass(frozen=True)
class Tunable:
    """One number of the migration flow: ``--<dashed name>``, ini ``katamaran_<name>``."""

    name: str
    default: float | None
    help: str
    integer: bool = False
    allow_zero: bool = False

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return f"katamaran_{self.name}"


# Defaults are the figures the two-node e2e passes with under nested TCG; the help text
# keeps the reason for each (it is what `pytest --help` shows).
TUNABLES = (
    Tunable(
        "tunnel_hold",
        30.0,
        "seconds the source keeps the IPIP tunnel after the move (katamaran -tunnel-hold). "
        "Long enough for both nodes' CNI step: a node step costs 10-15 s of Python start-up "
        "on a loaded TCG node; with 15 s, node B's route came 1.7 s after A's tunnel was "
        "gone and ~100 pings looped between the nodes. Default 30",
    ),
    Tunable(
        "dest_hold",
        None,
        "seconds the destination keeps decapsulating (its -tunnel-hold); it must outlast "
        "the source's tunnel. Default: tunnel hold + 5",
    ),
    Tunable(
        "converge_delay",
        2.0,
        "seconds after the source's completion line before the CNI routes change; must "
        "stay well below the tunnel hold. Default 2",
        allow_zero=True,
    ),
    Tunable(
        "writer_rate",
        2,
        "guest disk writes per second of the pod's writer. Under TCG in a TCG node each "
        "O_DSYNC write costs the nested QEMU about 55-70 ms of a node vCPU (measured: 10/s "
        "took 58-80 percent of one, against 10-13 idle), which the guest's ping answers then "
        "lack. Default 2",
        integer=True,
    ),
    Tunable(
        "tap_drain",
        2.0,
        "source -tap-drain-timeout in seconds (katamaran takes the frames off the tap "
        "itself, so the guest's speed does not matter). Default 2, as katamaran's",
    ),
    Tunable(
        "max_pause",
        60.0,
        "seconds of VM pause the destination's sch_plug must absorb at the ping rate "
        "(sizes -plug-limit, up to what a 6.1 kernel's tap ring takes). Default 60",
    ),
    Tunable(
        "node_cpus",
        None,
        "vCPUs of each lab node (--nodes=qemu). Default: 1 for TCG nodes whose pods may run "
        "under the node's KVM (--pod-accel auto or kvm): TCG emulates the SVM those pods "
        "use, and with 2 node vCPUs a node running KVM guests corrupted its own memory "
        "(a panic after 60 boots, resets after 5-16); with 1, 95 boots ran clean. "
        "Else the image's (2)",
        integer=True,
    ),
    Tunable(
        "nested_tcg_ping_interval",
        0.01,
        "ping interval towards a nested TCG pod when --ping-interval is not given. "
        "Default 0.01, the guide's 10 ms (10 of 10 e2e cases zero-drop here since the "
        "switchover gate); raise it where the nested pod cannot answer 100 pings/s",
    ),
    Tunable(
        "nested_tcg_ping_headroom",
        E2E_HEADROOM,
        "the paced ping towards a nested TCG pod runs at 1/X of the rate the pod kept up "
        "with when probed on an idle node (4: a quarter; 1: that rate). The migration "
        "takes the node's vCPUs from the pod and the destination's copy starts cold: on "
        "2026-12-03 pods pinged every 50 ms fell 15-60 s behind after the move and lost "
        "13, 572 and 153 pings. Default 4",
    ),
)


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The resolved :data:`TUNABLES` (seconds unless named otherwise)."""

    tunnel_hold: float = 30.0
    dest_hold: float | None = None
    converge_delay: float = 2.0
    writer_rate: int = 2
    tap_drain: float = 2.0
    max_pause: float = 60.0
    node_cpus: int | None = None
    nested_tcg_ping_interval: float = 0.01
    nested_tcg_ping_headroom: float = E2E_HEADROOM

    @property
    def dest_hold_s(self) -> float:
        """The destination's -tunnel-hold: the source's by default, as a user runs them.

        katamaran's destination keeps decapsulating past its hold for as long as
        tunnelled packets still arrive (until its tunnel has been quiet for 1 s), so the
        two holds need not be staggered by hand.
        """
        return self.dest_hold if self.dest_hold is not None else self.tunnel_hold


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
    kata: str = "auto"
    workload_qemu: str = "backports"
    pod_accel: str = "auto"  # the pods' QEMU on the nodes (agent workload-start --accel)
    tuning: Tuning = Tuning()

    def pod_ping_interval(self, pod_accel: str | None, node_accel: Accel | None) -> float:
        """The ping interval towards a pod whose QEMU runs on ``pod_accel`` (``kvm``,
        ``tcg``) in nodes on ``node_accel``: the user's, else a rate nested TCG can answer
        (the fastest: `paces_pod_ping`)."""
        if self.paces_pod_ping(pod_accel, node_accel):
            return self.tuning.nested_tcg_ping_interval
        return self.ping_interval

    def paces_pod_ping(self, pod_accel: str | None, node_accel: Accel | None) -> bool:
        """Whether the ping towards a pod is paced (pytest_katamaran.checks.pace): when its
        guest is translated twice (a TCG pod in a TCG node), unless the user set
        --ping-interval.  The pod is probed first and pinged at
        --nested-tcg-ping-interval, or slower if it cannot answer that.  A pod under the
        node's KVM, or a TCG pod in a KVM node, is pinged at --ping-interval (the
        guide's 10 ms)."""
        nested_tcg = pod_accel == "tcg" and node_accel is not None and node_accel.name == "tcg"
        return not self.ping_interval_set and nested_tcg

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
        image = _choice(config, "node_image", IMAGE_CHOICES, "debian", "node image")
        accel = _choice(config, "accel", ACCEL_CHOICES, "auto", "accel")
        kata = _choice(config, "kata", KATA_CHOICES, "auto", "kata mode")
        wq = _choice(config, "workload_qemu", WORKLOAD_QEMU_CHOICES, "backports", "workload QEMU")
        pod_accel = _choice(config, "pod_accel", ACCEL_CHOICES, "auto", "pod accel")
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
        tuning = Tuning(**{t.name: _tunable(config, t) for t in TUNABLES})
        if tuning.nested_tcg_ping_headroom < 1:
            raise pytest.UsageError(
                "katamaran: --nested-tcg-ping-headroom must be >= 1 (1: the rate the pod "
                f"kept up with), got {tuning.nested_tcg_ping_headroom:g}"
            )
        if tuning.converge_delay >= tuning.tunnel_hold:
            raise pytest.UsageError(
                f"katamaran: converge delay ({tuning.converge_delay:g} s) must be below the "
                f"tunnel hold ({tuning.tunnel_hold:g} s)"
            )
        return cls(
            nodes=nodes,
            node_image=image,
            accel=accel,
            keep_on_failure=keep,
            ping_interval=interval,
            results_dir=results.resolve(),
            rootdir=config.rootpath,
            ping_interval_set=raw_interval not in (None, ""),
            kata=kata,
            workload_qemu=wq,
            pod_accel=pod_accel,
            tuning=tuning,
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


def _choice(
    config: pytest.Config, name: str, choices: tuple[str, ...], default: str, what: str
) -> str:
    value = _pick(config, f"katamaran_{name}", f"katamaran_{name}") or default
    if value not in choices:
        raise pytest.UsageError(
            f"katamaran: unknown {what} {value!r} (ini katamaran_{name}); "
            f"choose from: {', '.join(choices)}"
        )
    return str(value)


def _tunable(config: pytest.Config, t: Tunable) -> float | int | None:
    raw = _pick(config, t.ini, t.ini)
    if raw in (None, ""):
        return t.default
    try:
        value: float | int = int(raw) if t.integer else float(raw)
    except (TypeError, ValueError):
        kind = "a whole number" if t.integer else "a number"
        raise pytest.UsageError(
            f"katamaran: {t.option} (ini {t.ini}) must be {kind}, got {raw!r}"
        ) from None
    if value < 0 or (value == 0 and not t.allow_zero):
        bound = ">= 0" if t.allow_zero else "> 0"
        raise pytest.UsageError(f"katamaran: {t.option} (ini {t.ini}) must be {bound}, got {raw}")
    return value
