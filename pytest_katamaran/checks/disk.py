"""Check a disk image written by the guest's diskwriter: is every acknowledged write on disk?

The guest writer (``guest/diskwriter.c``) stamps 4 KiB blocks in sequence and prints
``ACK <seq>`` once a write (and every earlier one) is durable. After a migration, the
destination's disk must hold every acknowledged write; this module checks exactly that,
without QEMU (``qemu-img`` is only used to read qcow2 images).

Block layout -- the single definition; ``diskwriter.c`` must match it byte for byte.
All integers little-endian; a block is ``BLOCK_SIZE`` (4096) bytes::

    offset size  field
    0      8     magic    b"KMRWRITE"
    8      8     seq      u64, 1, 2, 3, ... (0 is never written)
    16     8     block    u64, block index == seq % nblocks
    24     8     nblocks  u64, blocks on the device (device size // 4096)
    32     4     crc      u32, CRC-32 (zlib/IEEE) of bytes [0, 32) followed by [36, 4096)
    36     4060  pattern  byte at offset 36 + j is (seq + j) % 256

Seq ``s`` lives in block ``s % nblocks``, so the disk holds at most the last ``nblocks``
writes; older ones have legitimately been overwritten.
"""

from __future__ import annotations

import re
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK_SIZE = 4096
MAGIC = b"KMRWRITE"
HEADER = struct.Struct("<8sQQQ")  # magic, seq, block, nblocks
CRC = struct.Struct("<I")
CRC_OFFSET = HEADER.size  # 32
PATTERN_OFFSET = CRC_OFFSET + CRC.size  # 36
_PATTERN_BASE = bytes(range(256)) * 17  # long enough for any 4060-byte window
_QCOW2_MAGIC = b"QFI\xfb"
_ACK_RE = re.compile(rb"^ACK (\d+)\r?\n", re.MULTILINE)


@dataclass(frozen=True)
class Stamp:
    """One block's parsed stamp; ``crc_ok`` False means torn or corrupted."""

    seq: int
    block: int
    nblocks: int
    crc_ok: bool


def block_crc(block: bytes | memoryview) -> int:
    """CRC-32 of a block, skipping the crc field itself."""
    return zlib.crc32(block[PATTERN_OFFSET:], zlib.crc32(block[:CRC_OFFSET]))


def stamp(seq: int, nblocks: int) -> bytes:
    """The exact 4 KiB block the guest writer produces for ``seq`` (for tests and tooling)."""
    header = HEADER.pack(MAGIC, seq, seq % nblocks, nblocks)
    start = seq % 256
    pattern = _PATTERN_BASE[start : start + BLOCK_SIZE - PATTERN_OFFSET]
    crc = zlib.crc32(pattern, zlib.crc32(header))
    return header + CRC.pack(crc) + pattern


def parse_block(block: bytes | memoryview) -> Stamp | None:
    """Parse one block; None when it carries no stamp (e.g. never written)."""
    if bytes(block[: len(MAGIC)]) != MAGIC:
        return None
    _, seq, index, nblocks = HEADER.unpack_from(block)
    (crc,) = CRC.unpack_from(block, CRC_OFFSET)
    return Stamp(seq=seq, block=index, nblocks=nblocks, crc_ok=crc == block_crc(block))


def _is_qcow2(image: Path) -> bool:
    with image.open("rb") as f:
        return f.read(4) == _QCOW2_MAGIC


def read_guest_bytes(image: Path) -> bytes:
    """The guest-visible content of a raw or qcow2 image (qcow2 via ``qemu-img convert``)."""
    if not _is_qcow2(image):
        return image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="katamaran-diskcheck-") as tmp:
        raw = Path(tmp) / "disk.raw"
        # -U: the image may still be open by a (dead or paused) QEMU holding its lock.
        cmd = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(raw)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return raw.read_bytes()


def read_blocks(image: Path) -> list[Stamp | None]:
    """Parse every 4 KiB block of the image; index i is device block i."""
    data = memoryview(read_guest_bytes(image))
    end = len(data) - len(data) % BLOCK_SIZE  # the writer ignores a trailing partial block
    return [parse_block(data[o : o + BLOCK_SIZE]) for o in range(0, end, BLOCK_SIZE)]


@dataclass
class DiskReport:
    """Outcome of :func:`verify_writes`; ``ok`` means every acknowledged write is on disk."""

    nblocks: int
    acked: int
    highest: int  # highest valid seq found anywhere on disk (0: none)
    checked: int  # number of acknowledged seqs that had to be present
    missing: list[int] = field(default_factory=list)  # seqs whose block holds no/an older stamp
    corrupt: list[int] = field(default_factory=list)  # seqs whose block fails its checksum
    misplaced: list[int] = field(default_factory=list)  # seqs whose block holds a foreign stamp

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.misplaced)

    def __str__(self) -> str:
        def first(xs: list[int]) -> str:
            more = f" (+{len(xs) - 8} more)" if len(xs) > 8 else ""
            return f"{xs[:8]}{more}"

        verdict = "OK" if self.ok else "FAILED"
        return (
            f"disk check {verdict}: nblocks={self.nblocks} acked={self.acked} "
            f"highest={self.highest} checked={self.checked} missing={first(self.missing)} "
            f"corrupt={first(self.corrupt)} misplaced={first(self.misplaced)}"
        )


def check_blocks(blocks: list[Stamp | None], acked: int) -> DiskReport:
    """Check parsed blocks: each seq in (acked - nblocks, acked] must be durable in place."""
    nblocks = len(blocks)
    if nblocks == 0:
        raise ValueError("empty disk image")
    highest = max((b.seq for b in blocks if b is not None and b.crc_ok), default=0)
    report = DiskReport(nblocks=nblocks, acked=acked, highest=highest, checked=0)
    for s in range(max(0, acked - nblocks) + 1, acked + 1):
        report.checked += 1
        index = s % nblocks
        b = blocks[index]
        if b is None:
            report.missing.append(s)
        elif not b.crc_ok:
            report.corrupt.append(s)
        elif b.block != index or b.nblocks != nblocks or b.seq % nblocks != index:
            report.misplaced.append(s)
        elif b.seq < s:
            report.missing.append(s)
    return report


def verify_writes(image: Path, acked: int) -> DiskReport:
    """Check that every write the guest acknowledged (up to ``acked``) is on the image.

    Use as ``report = verify_writes(img, last_ack(log)); assert report.ok, report``.
    """
    return check_blocks(read_blocks(image), acked)


def last_ack(serial_log: Path) -> int:
    """Highest complete ``ACK <n>`` line in a serial log (0 when there is none).

    A final line without its newline may be cut short ("ACK 12" of "ACK 123"), so it is
    ignored: undercounting is safe, overcounting would blame the disk.
    """
    acks = [int(m) for m in _ACK_RE.findall(serial_log.read_bytes())]
    return max(acks, default=0)
