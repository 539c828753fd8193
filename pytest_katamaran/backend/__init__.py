"""Node backends: one module per way of providing the two lab nodes, chosen by ``--nodes``.

Backends are imported lazily so that a run without ``--nodes`` never pays for
(or breaks on) a backend's imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pytest_katamaran.ssh import SSHClient

BACKENDS: tuple[str, ...] = ("qemu",)


class UnknownBackend(ValueError):
    """``--nodes`` named a backend that does not exist."""


@runtime_checkable
class Node(Protocol):
    """One lab node as tests see it (Node A = source, Node B = destination)."""

    name: str
    ssh: SSHClient
    private_ip: str  # 10.0.0.1 (A) / 10.0.0.2 (B) on the inter-node link
    ssh_port: int
    serial_log: Path


@runtime_checkable
class Backend(Protocol):
    """What the ``nodes`` fixture drives: start both nodes, hand them out, always stop."""

    @property
    def node_a(self) -> Node:
        """The source node."""
        ...

    @property
    def node_b(self) -> Node:
        """The destination node."""
        ...

    def start(self) -> None:
        """Boot both nodes and return once both accept SSH."""
        ...

    def stop(self) -> None:
        """Tear everything down; must be safe to call twice or after a failed start."""
        ...

    def serial_logs(self) -> Any:
        """Serial console logs: a mapping of node name to Path (or an iterable of Paths)."""
        ...


def get_backend(name: str, config: Any) -> Backend:
    """Instantiate the backend called ``name`` with the resolved ``KatamaranConfig``."""
    if name == "qemu":
        from pytest_katamaran.backend.qemu import QemuNodes

        return QemuNodes(config)
    raise UnknownBackend(
        f"unknown katamaran node backend {name!r}; available: {', '.join(BACKENDS)}"
    )
