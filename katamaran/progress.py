"""Progress and summary lines on stderr: one line per step, a repainting line for percentages."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class Progress:
    """Writes `katamaran: ...` lines; percentages repaint in place on a terminal."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (OSError, ValueError):
            self.tty = False
        self.started = time.monotonic()
        self._open = False
        self.broken = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, message: str) -> None:
        self._close_line()
        self._write(f"katamaran: {message}\n")

    def warn(self, message: str) -> None:
        self._close_line()
        self._write(f"katamaran: WARNING: {message}\n")

    def update(self, message: str) -> None:
        """A progress figure: repainted on a terminal, a plain line in a log."""
        if self.tty:
            self._write(f"\rkatamaran: {message}\033[K")
            self._open = True
        else:
            self._write(f"katamaran: {message}\n")

    def _close_line(self) -> None:
        if self._open:
            self._open = False
            self._write("\n")

    def _write(self, text: str) -> None:
        """Never raise: a dropped ssh session (EPIPE/EIO on stderr) must not stop a
        migration half-way, least of all its cleanup.  Once the stream has failed,
        nothing more is written to it."""
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            self.broken = True
