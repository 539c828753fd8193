"""The last lines of a log file: the one helper every failure message uses.

Why one module with no imports beyond the standard library: the node agent
(``nodeside``, run on a TCG node where each import costs seconds) uses it too.
Reads at most the last 64 KiB, so a serial log of hundreds of MiB costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_BYTES = 64 * 1024


def tail(path: Path | str, lines: int = 80) -> str:
    """The last ``lines`` lines of ``path`` (CRs dropped); a readable note if it cannot be."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - MAX_BYTES))
            data = fh.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror or exc})"
    text = data.decode(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"
