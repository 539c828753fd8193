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
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._open = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def step(self, message: str) -> None:
        self._close_line()
        print(f"katamaran: {message}", file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        self._close_line()
        print(f"katamaran: WARNING: {message}", file=self.stream, flush=True)

    def update(self, message: str) -> None:
        """A progress figure: repainted on a terminal, a plain line in a log."""
        if self.tty:
            print(f"\rkatamaran: {message}\033[K", end="", file=self.stream, flush=True)
            self._open = True
        else:
            print(f"katamaran: {message}", file=self.stream, flush=True)

    def _close_line(self) -> None:
        if self._open:
            print(file=self.stream)
            self._open = False
