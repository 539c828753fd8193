"""Names of what katamaran creates in the kernel, computable without pyroute2.

Why a module of its own: a run looks for a killed run's leftovers before it has any
reason to import pyroute2 (0.3-0.7 s on a busy node), and pays that only when one is
there (SourceMigration._remove_stale_diverts).
"""

from __future__ import annotations

import zlib

from .config import IPAddress


def crc(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def divert_names(vm_ip: IPAddress, tap: str) -> tuple[str, str]:
    """A divert's veth pair (see divert): (katamaran's end, the pod's end); 14 characters."""
    tag = f"{crc('divert', vm_ip, tap):08x}"
    return f"kmrd-{tag}", f"kmrq-{tag}"
