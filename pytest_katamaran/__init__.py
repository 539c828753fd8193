"""pytest_katamaran: fixtures that boot QEMU nodes, start Kata pods and prove zero-drop
live migration.

The public API, importable from here (fixtures come through the plugin itself)::

    from pytest_katamaran import assert_zero_drop, verify_writes, KataPod, MigrationResult

Names are imported on first use (PEP 562): the node agent (``pytest_katamaran.agent.node``)
runs on TCG nodes where importing pytest or pyroute2 costs seconds, and importing this
package must not drag them in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_katamaran.checks.disk import DiskReport, verify_writes
    from pytest_katamaran.checks.ping import PingMonitor, PingStats, assert_zero_drop
    from pytest_katamaran.errors import (
        HarnessError,
        KataUnavailable,
        NodeStepFailed,
        PodError,
        RuntimeNotImplemented,
    )
    from pytest_katamaran.migration import MigrationResult
    from pytest_katamaran.pod import KataPod, WriteCheck

_EXPORTS = {
    "assert_zero_drop": "pytest_katamaran.checks.ping",
    "PingMonitor": "pytest_katamaran.checks.ping",
    "PingStats": "pytest_katamaran.checks.ping",
    "verify_writes": "pytest_katamaran.checks.disk",
    "DiskReport": "pytest_katamaran.checks.disk",
    "KataPod": "pytest_katamaran.pod",
    "WriteCheck": "pytest_katamaran.pod",
    "MigrationResult": "pytest_katamaran.migration",
    "HarnessError": "pytest_katamaran.errors",
    "NodeStepFailed": "pytest_katamaran.errors",
    "KataUnavailable": "pytest_katamaran.errors",
    "PodError": "pytest_katamaran.errors",
    "RuntimeNotImplemented": "pytest_katamaran.errors",
}

__all__ = [
    "DiskReport",
    "HarnessError",
    "KataPod",
    "KataUnavailable",
    "MigrationResult",
    "NodeStepFailed",
    "PingMonitor",
    "PingStats",
    "PodError",
    "RuntimeNotImplemented",
    "WriteCheck",
    "assert_zero_drop",
    "verify_writes",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_katamaran' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
