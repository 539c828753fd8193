"""diskcheck logic on hand-made images, plus a byte-for-byte check of the C writer's layout."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from pytest_katamaran.checks import disk as diskcheck
from pytest_katamaran.checks.disk import BLOCK_SIZE, last_ack, stamp, verify_writes


def make_image(path: Path, nblocks: int, seqs: range | list[int]) -> Path:
    """A raw image of nblocks zero blocks, then each seq stamped in order (later overwrite)."""
    data = bytearray(nblocks * BLOCK_SIZE)
    for s in seqs:
        off = (s % nblocks) * BLOCK_SIZE
        data[off : off + BLOCK_SIZE] = stamp(s, nblocks)
    path.write_bytes(data)
    return path


def patch_block(path: Path, index: int, block: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(index * BLOCK_SIZE)
        f.write(block)


def test_stamp_layout_is_as_documented():
    b = stamp(0x1234, 100)
    assert len(b) == BLOCK_SIZE
    assert b[0:8] == b"KMRWRITE"
    assert struct.unpack_from("<QQQ", b, 8) == (0x1234, 0x1234 % 100, 100)
    assert struct.unpack_from("<I", b, 32)[0] == zlib.crc32(b[:32] + b[36:])
    assert all(b[36 + j] == (0x1234 + j) % 256 for j in range(BLOCK_SIZE - 36))


def test_complete_image_passes(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 11))
    report = verify_writes(img, acked=10)
    assert report.ok, report
    assert (report.nblocks, report.acked, report.highest, report.checked) == (16, 10, 10, 10)


def test_unacked_writes_beyond_ack_are_fine(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 14))
    report = verify_writes(img, acked=10)
    assert report.ok, report
    assert report.highest == 13


def test_nothing_acked_passes_on_blank_disk(tmp_path):
    img = make_image(tmp_path / "d.raw", 4, [])
    report = verify_writes(img, acked=0)
    assert report.ok and report.checked == 0 and report.highest == 0


def test_zeroed_block_fails(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 11))
    patch_block(img, 5, bytes(BLOCK_SIZE))
    report = verify_writes(img, acked=10)
    assert not report.ok
    assert report.missing == [5]
    assert "FAILED" in str(report) and "missing=[5]" in str(report)


def test_lost_tail_fails(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 9))
    report = verify_writes(img, acked=10)
    assert report.missing == [9, 10]


def test_wrong_checksum_fails(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 11))
    block = bytearray(stamp(7, 16))
    block[2000] ^= 0xFF
    patch_block(img, 7, bytes(block))
    report = verify_writes(img, acked=10)
    assert report.corrupt == [7] and not report.missing


def test_misplaced_block_fails(tmp_path):
    img = make_image(tmp_path / "d.raw", 16, range(1, 11))
    patch_block(img, 3, stamp(4, 16))  # seq 4's content landed in block 3
    report = verify_writes(img, acked=10)
    assert report.misplaced == [3]


def test_wraparound(tmp_path):
    nblocks = 8
    img = make_image(tmp_path / "d.raw", nblocks, range(1, 30))
    report = verify_writes(img, acked=29)
    assert report.ok, report
    assert report.checked == nblocks and report.highest == 29
    # The disk keeps only the last nblocks writes: seqs <= 21 are legitimately gone.
    assert verify_writes(img, acked=27).ok
    # A block still holding the previous lap's stamp means the newer write was lost.
    patch_block(img, 27 % nblocks, stamp(27 - nblocks, nblocks))
    assert verify_writes(img, acked=29).missing == [27]


def test_trailing_partial_block_is_ignored(tmp_path):
    img = make_image(tmp_path / "d.raw", 4, range(1, 4))
    with img.open("ab") as f:
        f.write(b"KMRW")
    report = verify_writes(img, acked=3)
    assert report.ok and report.nblocks == 4


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not found on PATH")
def test_qcow2_image_is_read_through_qemu_img(tmp_path):
    raw = make_image(tmp_path / "d.raw", 32, range(1, 50))
    patch_block(raw, 45 % 32, bytes(BLOCK_SIZE))
    qcow = tmp_path / "d.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
    )
    report = verify_writes(qcow, acked=49)
    assert report.missing == [45] and report.nblocks == 32


def test_last_ack(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(
        b"katamaran: ready\r\nACK 5\r\n[  1.0] some kernel line\r\nACK 12\r\nxACK 99\r\nACK 130"
    )
    assert last_ack(log) == 12  # "ACK 130" has no newline yet: maybe cut short
    log.write_bytes(b"")
    assert last_ack(log) == 0


@pytest.fixture(scope="module")
def c_writer(tmp_path_factory) -> Path:
    """The guest's disk writer, compiled once for this module exactly as for the guest."""
    from pytest_katamaran.images.guest import compile_guest_program

    if shutil.which("gcc") is None:
        pytest.skip("gcc not found on PATH (apt-get install gcc libc6-dev)")
    return compile_guest_program(tmp_path_factory.mktemp("writer") / "diskwriter")


def test_c_writer_matches_python_layout(tmp_path, c_writer):
    """Run the real guest writer on a file: the disk check and the layout must agree."""
    nblocks, writes = 64, 300  # wraps around several times
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(nblocks * BLOCK_SIZE))
    proc = subprocess.run(
        [str(c_writer), str(disk), "0", str(writes)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"DISKWRITER nblocks={nblocks}\n")
    log = tmp_path / "serial.log"
    log.write_text(proc.stdout)
    assert last_ack(log) == writes
    report = verify_writes(disk, acked=writes)
    assert report.ok and report.highest == writes, report
    data = disk.read_bytes()
    for s in range(writes - nblocks + 1, writes + 1):
        off = (s % nblocks) * BLOCK_SIZE
        assert data[off : off + BLOCK_SIZE] == stamp(s, nblocks), f"seq {s} differs"


def test_c_writer_throttle(tmp_path, c_writer):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(16 * BLOCK_SIZE))
    t0 = os.times().elapsed
    proc = subprocess.run([str(c_writer), str(disk), "100", "21"], capture_output=True, text=True)
    elapsed = os.times().elapsed - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed >= 0.19  # 21 writes at 100/s: the last is due 200 ms after the first
    assert diskcheck.verify_writes(disk, acked=21).ok
