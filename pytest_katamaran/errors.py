"""Errors of the test harness, rooted at one class so a caller can catch them all.

The tree (as qemu.qmp draws its own)::

    HarnessError                 anything the harness itself reports
     +-- NodeStepFailed          a node-agent step (`nodeside`) failed on a node; carries
     |                           the node, the command, the step's JSON, stderr and the
     |                           node's serial log tail
     +-- KataUnavailable         --kata=runtime asked for, the node has no Kata runtime;
     |                           carries the node and the binaries looked for
     +-- RuntimeNotImplemented   the node has Kata, but pods through containerd are not
     |                           built yet; carries the node and the binaries found
     +-- PodError                a Kata pod could not be started, found or moved; carries
     |                           the node
     +-- TimelineError           a migration's timeline picture cannot be drawn from what
                                 the results hold (no timestamped ping replies, no events)

A failed migration is not an exception: ``migrate()`` returns a MigrationResult whose
``ok`` is False and whose ``problems``/``explain()`` say why.

Why a separate root from ``katamaran.errors.KatamaranError``: those are the migration
core's errors (what a user of the CLI sees); these are the harness's (what a test author
sees).  A test failing on either should say which side broke.
"""

from __future__ import annotations

from typing import Any


class HarnessError(Exception):
    """Root of every error the pytest_katamaran harness raises on purpose."""


class NodeStepFailed(HarnessError):
    """A node-agent step reported failure (``ok: false``) or printed no JSON.

    Data, not just text: ``node`` (its name), ``command`` (the full remote command line),
    ``data`` (the step's JSON), ``stderr`` and ``serial_tail`` (the node's console).
    """

    def __init__(
        self,
        node: str,
        command: str,
        data: dict[str, Any],
        stderr: str = "",
        serial_tail: str = "",
    ) -> None:
        self.node = node
        self.command = command
        self.data = data
        self.stderr = stderr
        self.serial_tail = serial_tail
        super().__init__(f"{node}: node step failed: {data.get('error')}")

    def __str__(self) -> str:
        import json

        details = {k: v for k, v in self.data.items() if k != "error"}
        parts = [
            f"{self.node}: `{self.command}` failed: {self.data.get('error')}",
            json.dumps(details, indent=1, default=str)[:6000],
        ]
        if self.stderr.strip():
            parts.append(f"stderr:\n{self.stderr.strip()[-3000:]}")
        if self.serial_tail.strip():
            parts.append(f"serial log tail of {self.node}:\n{self.serial_tail}")
        return "\n".join(parts)


class KataUnavailable(HarnessError):
    """The node has no Kata runtime (``missing`` names the binaries looked for)."""

    def __init__(self, node: str, missing: tuple[str, ...]) -> None:
        self.node = node
        self.missing = missing
        super().__init__(
            f"--kata=runtime: {node} has none of {', '.join(missing)} on PATH "
            "(real Kata through containerd needs them)"
        )


class RuntimeNotImplemented(HarnessError):
    """The node has Kata (``found``), but starting pods through containerd is not built."""

    def __init__(self, node: str, found: list[str]) -> None:
        self.node = node
        self.found = found
        super().__init__(
            f"{node} has {', '.join(found)}: real Kata pods through containerd are not "
            "implemented by this harness yet (nothing here to prove them on); "
            "--kata=sandbox runs the Kata-shaped sandbox instead"
        )


class PodError(HarnessError):
    """A pod could not be started, found or checked (``node`` says where)."""

    def __init__(self, node: str, message: str) -> None:
        self.node = node
        super().__init__(f"{node}: {message}")


class TimelineError(HarnessError):
    """The timeline picture cannot be drawn from the data given (the message says what is
    missing); the plugin turns it into a warning line, never a test failure."""
