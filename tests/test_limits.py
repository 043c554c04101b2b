"""What a hostile frontend cannot make a backend do: map without bound, or fault on a file
too small for its region (docs/reliability.md, "Limits")."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MakeBlk, fd_is_open, memfd
from pvbus.vhost_user.backend import BackendSession, Limits
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import Flags, MemTable, Message, Region, Request, SingleRegion
from pvbus.virtio.errors import GuestMemoryError
from pvbus.virtio.memory import MemoryRegion

MiB = 1 << 20


class _Quiet:
    def ring_started(self, index: int, kick_fd: int | None) -> None:
        pass

    def ring_stopped(self, index: int) -> None:
        pass


def _session(make_blk: MakeBlk, **limits: int) -> BackendSession:
    return BackendSession(make_blk(), _Quiet(), **limits)


def test_memory_table_beyond_the_byte_limit_is_refused_and_its_fds_closed(
    make_blk: MakeBlk,
) -> None:
    session = _session(make_blk, max_memory=2 * MiB)
    fds = (memfd(2 * MiB), memfd(2 * MiB))
    table = MemTable((Region(0, 2 * MiB, 0x1000_0000, 0), Region(4 * MiB, 2 * MiB, 0x2000_0000, 0)))
    with pytest.raises(RemoteProtocolError, match="limit"):
        session.handle(Message(Request.SET_MEM_TABLE, table, Flags.VERSION, fds))
    assert not any(fd_is_open(fd) for fd in fds)
    assert len(session.device.mem) == 0
    session.close()


def test_add_mem_reg_beyond_the_byte_limit_is_refused(make_blk: MakeBlk) -> None:
    session = _session(make_blk, max_memory=3 * MiB)
    first = memfd(2 * MiB)
    add = SingleRegion(Region(0, 2 * MiB, 0x1000_0000, 0))
    session.handle(Message(Request.ADD_MEM_REG, add, Flags.VERSION, (first,)))
    second = memfd(2 * MiB)
    more = SingleRegion(Region(4 * MiB, 2 * MiB, 0x2000_0000, 0))
    with pytest.raises(RemoteProtocolError, match="bytes"):
        session.handle(Message(Request.ADD_MEM_REG, more, Flags.VERSION, (second,)))
    assert not fd_is_open(second)
    assert len(session.device.mem) == 1
    session.close()


def test_region_past_the_end_of_its_file_is_refused_not_a_sigbus() -> None:
    fd = memfd(MiB)
    try:
        with pytest.raises(GuestMemoryError, match="past its file"):
            MemoryRegion.map_fd(fd, 0, 2 * MiB, 0, 0)
        with pytest.raises(GuestMemoryError, match="past its file"):
            MemoryRegion.map_fd(fd, 0, MiB, 0, 4096)
    finally:
        os.close(fd)


def test_a_mapped_memfd_is_sealed_against_shrinking() -> None:
    fd = os.memfd_create("pvbus-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MiB)
    region = MemoryRegion.map_fd(fd, 0, MiB, 0, 0)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        region.buf[MiB - 1] = 7  # still there, no fault
    finally:
        region.close()
        os.close(fd)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_mem_slots=0)
    with pytest.raises(ValueError):
        Limits(max_mem_slots=510)
    with pytest.raises(ValueError):
        Limits(max_memory=4096)


def test_serve_cli_rejects_bad_limits(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    argv = [sys.executable, "-m", "pvbus.cli.main", "serve", "blk", "--image", str(image)]
    argv += ["--socket-path", str(tmp_path / "s"), "--max-mem-slots", "9999"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "slots" in result.stderr
    assert not (tmp_path / "s").exists()


def test_discard_with_more_segments_than_advertised_is_refused_without_work(
    make_blk: MakeBlk,
) -> None:
    """A fuzzer found 2,000-segment write-zeroes requests taking seconds each: one segment only
    (max_discard_seg = max_write_zeroes_seg = 1), checked before anything is copied."""
    from pvbus.devices.blk.device import S_IOERR, S_OK, T_DISCARD, T_WRITE_ZEROES
    from test_blk import Blk, hdr, seg

    blk = Blk(make_blk(), queue_size=8)
    many = b"".join(seg(i, 1) for i in range(2048))
    for rtype in (T_DISCARD, T_WRITE_ZEROES):
        assert blk.request([hdr(rtype), many], [1])[0] == S_IOERR
        assert blk.request([hdr(rtype), seg(0, 1) + seg(4, 1)], [1])[0] == S_IOERR
        assert blk.request([hdr(rtype), seg(0, 1)[:15]], [1])[0] == S_IOERR
        assert blk.request([hdr(rtype), seg(8, 2)], [1])[0] == S_OK
    config = blk.device.read_config()
    assert int.from_bytes(config[40:44], "little") == 1  # max_discard_seg
    assert int.from_bytes(config[52:56], "little") == 1  # max_write_zeroes_seg
