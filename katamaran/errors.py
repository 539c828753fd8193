"""Typed errors: each carries the one-line message a user sees and the exit code."""

from __future__ import annotations


class KatamaranError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""

    exit_code = 1


class UsageError(KatamaranError):
    """Bad command-line input: printed with a hint, exit code 2."""

    exit_code = 2


class QMPTimeout(KatamaranError):
    """QEMU did not answer a command in time (it may be hung)."""


class QMPClosed(KatamaranError):
    """The QMP connection went away: QEMU exited or closed the socket."""


class QMPCommandError(KatamaranError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command} failed: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class Aborted(KatamaranError):
    """SIGINT/SIGTERM/SIGHUP before the point of no return: cleanup ran, exit 130."""

    exit_code = 130


class OutcomeUncertain(KatamaranError):
    """After migrate-continue the outcome is not known: nothing was resumed, exit 3.

    Resuming either side could leave two copies of the VM running (and, with shared
    storage, writing one disk), so the operator decides which side to `cont`.
    """

    exit_code = 3
