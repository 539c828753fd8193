"""One katamaran per VM: an flock on a file named after the QMP socket, held for the run.

Without it a second run on the same VM would take the first run's live migration for a
leftover and tear it down.  The lock also proves that whatever a run finds on the VM
(a migration paused in `pre-switchover`, a block job, changed migration settings) was
left by a katamaran that is gone, so it may be recovered.  The migration settings a run
is about to change are written next to the lock (`<key>.json`) before the change, so
the run after a SIGKILL can put back the values from before the killed run; the
destination does the same for the sysctls it changes (`<key>.sysctls.json`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import KatamaranError

LOCK_DIR = Path("/run/lock/katamaran")


def lock_dirs() -> list[Path]:
    """/run/lock (tmpfs, cleared at boot like the VMs), else a temp dir if not writable."""
    return [LOCK_DIR, Path(tempfile.gettempdir()) / f"katamaran-locks-{os.getuid()}"]


class VMLock:
    """Exclusive, non-blocking flock for one QMP socket; released when the process dies."""

    def __init__(self, qmp: Path, dirs: list[Path] | None = None) -> None:
        self.qmp = Path(qmp)
        key = hashlib.sha256(str(self.qmp.resolve()).encode()).hexdigest()[:32]
        self.key = key
        self.dirs = dirs if dirs is not None else lock_dirs()
        self.path: Path | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        last: OSError | None = None
        for folder in self.dirs:
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(folder / f"{self.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as err:
                last = err
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise KatamaranError(
                    f"another katamaran (pid {holder}) is already migrating the VM at {self.qmp}"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._fd = fd
            self.path = folder / f"{self.key}.lock"
            return
        raise KatamaranError(f"cannot create a lock file for {self.qmp}: {last}")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the file stays: unlinking it would race a waiting run
            self._fd = None

    def __enter__(self) -> VMLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # Saved state (see module docstring); only touched while the lock is held.  `part`
    # names the file next to the lock: "" for the source's QEMU settings, "sysctls" for
    # the destination's changed sysctls.
    def _state(self, part: str = "") -> Path:
        assert self.path is not None, "lock not held"
        return self.path.with_suffix(f".{part}.json" if part else ".json")

    def load_state(self, part: str = "") -> dict[str, Any] | None:
        try:
            return json.loads(self._state(part).read_text())
        except (OSError, ValueError):
            return None

    def save_state(self, state: dict[str, Any], part: str = "") -> None:
        path = self._state(part)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def clear_state(self, part: str = "") -> None:
        with contextlib.suppress(FileNotFoundError):
            self._state(part).unlink()
