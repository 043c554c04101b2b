"""virtio-blk (VIRTIO 1.2 section 5.2) on a temporary raw image, driven by MockDriverQueue."""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
from pathlib import Path

import pytest

from conftest import MakeBlk
from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.devices.blk import cli as blk_cli
from pvbus.devices.blk.device import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    open_image,
)
from pvbus.testing import FakeGuest, MockDriverQueue, MockPackedDriverQueue, mock_queue
from pvbus.virtio.blk import F_DISCARD, F_FLUSH, F_RO, F_WRITE_ZEROES
from pvbus.virtio.constants import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pvbus.virtio.errors import QueueError

SECTORS = 2048  # the image fixture: 1 MiB, sector n filled with n % 251


def sector(n: int) -> bytes:
    return bytes([n % 251]) * 512


def hdr(rtype: int, sec: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sec)


def seg(sec: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sec, count, flags)


class Blk:
    """A BlockDevice with one mock driver queue per queue on a FakeGuest (split rings, or
    packed ones with ``packed``)."""

    def __init__(self, device: BlockDevice, queue_size: int = 64, *, packed: bool = False) -> None:
        self.device = device
        self.guest = FakeGuest(1 << 22)
        device.mem = self.guest.mem
        self.drivers: list[MockDriverQueue | MockPackedDriverQueue] = []
        for i in range(device.num_queues):
            drv = mock_queue(self.guest, queue_size, packed=packed)
            device.queues[i] = drv.device_queue
            self.drivers.append(drv)
        self.interrupts: list[int] = []
        device.interrupt = self.interrupts.append

    def request(
        self,
        readable: list[bytes],
        writable: list[int],
        *,
        queue: int = 0,
        indirect: bool = False,
    ) -> tuple[int, int, list[bytes]]:
        """Send, process; return (status, written length, writable buffers but the status)."""
        drv = self.drivers[queue]
        drv.send(readable, writable, indirect=indirect)
        self.device.process(queue)
        [(_, length, bufs)] = drv.receive()
        return bufs[-1][-1], length, [*bufs[:-1], bufs[-1][:-1]] if bufs[-1][:-1] else bufs[:-1]

    def simple(self, rtype: int, sec: int, data: bytes = b"", read: int = 0) -> tuple[int, bytes]:
        status, length, bufs = self.request(
            [hdr(rtype, sec), data] if data else [hdr(rtype, sec)], [read, 1] if read else [1]
        )
        body = b"".join(bufs)
        assert length == 1 + (len(body) if status == S_OK else 0)
        return status, body


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def blk(make_blk: MakeBlk, request: pytest.FixtureRequest) -> Blk:
    """A disk on split rings, then on packed ones: tests that take it run on both."""
    return Blk(make_blk(), packed=request.param)


def image_bytes(device: BlockDevice, offset: int, length: int) -> bytes:
    return os.pread(device.fd, length, offset)


def test_features_and_config(make_blk: MakeBlk) -> None:
    device = make_blk()
    features = device.device_features()
    for bit in (F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX, F_FLUSH, F_DISCARD, F_WRITE_ZEROES):
        assert features >> bit & 1
    assert not features >> F_RO & 1
    assert device.capacity == SECTORS
    assert len(device.read_config()) == 60


def test_read(blk: Blk) -> None:
    status, data = blk.simple(T_IN, 3, read=1024)
    assert status == S_OK
    assert data == sector(3) + sector(4)
    assert blk.interrupts == [0]


def test_write_lands_exact_bytes(blk: Blk) -> None:
    payload = os.urandom(1536)
    status, _ = blk.simple(T_OUT, 100, payload)
    assert status == S_OK
    assert image_bytes(blk.device, 100 * 512, 1536) == payload
    assert image_bytes(blk.device, 99 * 512, 512) == sector(99)
    assert image_bytes(blk.device, 103 * 512, 512) == sector(103)
    status, data = blk.simple(T_IN, 100, read=1536)
    assert data == payload


def test_flush_and_write_through(blk: Blk) -> None:
    assert blk.simple(T_FLUSH, 0) == (S_OK, b"")
    blk.device.write_config(32, b"\x00")  # write-through
    assert blk.device.writeback == 0
    assert blk.simple(T_OUT, 1, b"w" * 512)[0] == S_OK
    assert image_bytes(blk.device, 512, 512) == b"w" * 512
    blk.device.reset()
    assert blk.device.writeback == 1


def test_get_id(make_blk: MakeBlk) -> None:
    blk = Blk(make_blk(serial="disk-7"))
    status, data = blk.simple(T_GET_ID, 0, read=20)
    assert status == S_OK
    assert data == b"disk-7" + bytes(14)
    # Spread over descriptors, in a larger buffer.
    status, length, bufs = blk.request([hdr(T_GET_ID)], [3, 30, 1])
    assert status == S_OK
    assert length == 21
    assert bufs[0] + bufs[1][:17] == b"disk-7" + bytes(14)
    full = Blk(make_blk(serial="x" * 20))
    assert full.simple(T_GET_ID, 0, read=20) == (S_OK, b"x" * 20)


def test_get_id_short_buffer(blk: Blk) -> None:
    status, length, _ = blk.request([hdr(T_GET_ID)], [19, 1])
    assert status == S_IOERR
    assert length == 1


def test_discard_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(b"\xab" * (4 << 20))
    device = BlockDevice(BlkConfig(str(path)))
    try:
        blk = Blk(device)
        before = os.stat(path).st_blocks
        status, _ = blk.simple(T_DISCARD, 0, seg(2048, 4096))  # the second and third MiB
        assert status == S_OK
        assert os.stat(path).st_blocks <= before - (2 << 20) // 512
        assert image_bytes(device, 1 << 20, 2 << 20) == bytes(2 << 20)
        assert image_bytes(device, (1 << 20) - 512, 512) == b"\xab" * 512
        assert image_bytes(device, 3 << 20, 512) == b"\xab" * 512
        assert os.path.getsize(path) == 4 << 20
    finally:
        device.close()


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(blk: Blk, unmap: int) -> None:
    status, _ = blk.simple(T_WRITE_ZEROES, 0, seg(10, 3, unmap))
    assert status == S_OK
    assert image_bytes(blk.device, 10 * 512, 3 * 512) == bytes(3 * 512)
    assert image_bytes(blk.device, 9 * 512, 512) == sector(9)
    assert image_bytes(blk.device, 13 * 512, 512) == sector(13)
    assert os.fstat(blk.device.fd).st_size == SECTORS * 512


@pytest.mark.parametrize(
    ("rtype", "segments", "expected"),
    [
        (T_DISCARD, seg(0, 1, 1), S_UNSUPP),  # unmap flag on discard
        (T_WRITE_ZEROES, seg(0, 1, 2), S_UNSUPP),  # reserved flag
        (T_DISCARD, seg(SECTORS - 1, 2), S_IOERR),
        (T_WRITE_ZEROES, seg(SECTORS, 1), S_IOERR),
        (T_DISCARD, seg(0, 1)[:10], S_IOERR),  # not a whole segment
        (T_WRITE_ZEROES, seg((1 << 64) - 1, 1), S_IOERR),
        (T_DISCARD, seg(0, (1 << 32) - 1), S_IOERR),
    ],
)
def test_bad_discard_and_write_zeroes(blk: Blk, rtype: int, segments: bytes, expected: int) -> None:
    assert blk.simple(rtype, 0, segments)[0] == expected
    assert image_bytes(blk.device, 0, 512) == sector(0)


def test_discard_with_no_segment(blk: Blk) -> None:
    assert blk.simple(T_DISCARD, 0)[0] == S_IOERR


def test_header_split_across_descriptors(blk: Blk) -> None:
    h = hdr(T_OUT, 7)
    payload = b"s" * 512
    status, _, _ = blk.request([h[:3], h[3:11], h[11:] + payload[:100], payload[100:]], [1])
    assert status == S_OK
    assert image_bytes(blk.device, 7 * 512, 512) == payload
    status, _, bufs = blk.request([h[:1], h[1:]], [1])  # header then no data: a no-op write
    assert status == S_OK
    status, length, bufs = blk.request([hdr(T_IN, 7)[:5], hdr(T_IN, 7)[5:]], [512, 1])
    assert (status, length, bufs) == (S_OK, 513, [payload])


def test_data_spread_over_many_descriptors(blk: Blk) -> None:
    pieces = [os.urandom(n) for n in (1, 511, 100, 900, 24, 512)]  # 2048 bytes
    status, _, _ = blk.request([hdr(T_OUT, 20), *pieces], [1])
    assert status == S_OK
    assert image_bytes(blk.device, 20 * 512, 2048) == b"".join(pieces)
    status, length, bufs = blk.request([hdr(T_IN, 20)], [7, 1000, 41, 1000, 1])
    assert status == S_OK
    assert length == 2049
    assert b"".join(bufs) == b"".join(pieces)


def test_data_and_status_in_one_descriptor(blk: Blk) -> None:
    drv = blk.drivers[0]
    drv.send([hdr(T_IN, 5)], [513])
    blk.device.process(0)
    [(_, length, [buf])] = drv.receive()
    assert length == 513
    assert buf == sector(5) + bytes([S_OK])


def test_indirect_request(blk: Blk) -> None:
    status, length, bufs = blk.request([hdr(T_IN, 2)], [256, 256, 1], indirect=True)
    assert (status, length) == (S_OK, 513)
    assert b"".join(bufs) == sector(2)


def test_read_only(make_blk: MakeBlk, image: Path) -> None:
    device = make_blk(read_only=True)
    assert device.device_features() >> F_RO & 1
    assert not device.device_features() >> F_DISCARD & 1
    assert fcntl.fcntl(device.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    blk = Blk(device)
    assert blk.simple(T_OUT, 0, b"x" * 512)[0] == S_IOERR
    assert blk.simple(T_DISCARD, 0, seg(0, 1))[0] == S_IOERR
    assert blk.simple(T_WRITE_ZEROES, 0, seg(0, 1))[0] == S_IOERR
    assert blk.simple(T_IN, 0, read=512) == (S_OK, sector(0))
    assert blk.simple(T_FLUSH, 0)[0] == S_OK
    assert image.read_bytes()[:512] == sector(0)


@pytest.mark.parametrize(
    ("rtype", "sec", "length"),
    [
        (T_IN, SECTORS, 512),
        (T_IN, SECTORS - 1, 1024),
        (T_IN, (1 << 64) - 1, 512),
        (T_OUT, SECTORS, 512),
        (T_OUT, SECTORS - 1, 1024),
        (T_IN, 0, 100),  # not a multiple of 512
        (T_OUT, 0, 513),
        (T_IN, 0, 511),
    ],
)
def test_out_of_range_and_partial_sectors(blk: Blk, rtype: int, sec: int, length: int) -> None:
    if rtype == T_IN:
        status, length_written, _ = blk.request([hdr(T_IN, sec)], [length, 1])
    else:
        status, length_written, _ = blk.request([hdr(T_OUT, sec), b"\xfe" * length], [1])
    assert status == S_IOERR
    assert length_written == 1
    assert b"\xfe" not in image_bytes(blk.device, 0, SECTORS * 512)


def test_last_sector_is_reachable(blk: Blk) -> None:
    assert blk.simple(T_IN, SECTORS - 1, read=512) == (S_OK, sector(SECTORS - 1))
    assert blk.simple(T_IN, SECTORS, read=0)[0] == S_OK  # zero-length at the end


@pytest.mark.parametrize("rtype", [2, 3, 5, 9, 0xFFFF_FFFF])
def test_unknown_type(blk: Blk, rtype: int) -> None:
    assert blk.simple(rtype, 0, read=512)[0] == S_UNSUPP


@pytest.mark.parametrize("readable", [[], [b"short"], [hdr(T_IN)[:15]]])
def test_missing_or_short_header(blk: Blk, readable: list[bytes]) -> None:
    status, length, _ = blk.request(readable, [512, 1])
    assert (status, length) == (S_IOERR, 1)


def test_no_status_byte_is_a_queue_error_and_other_queues_work(make_blk: MakeBlk) -> None:
    blk = Blk(make_blk(num_queues=2))
    blk.drivers[0].send([hdr(T_IN, 0)], [])
    with pytest.raises(QueueError, match="status"):
        blk.device.process(0)
    blk.drivers[0].send([hdr(T_IN, 0)], [0])
    with pytest.raises(QueueError, match="status"):
        blk.device.process(0)
    status, _, bufs = blk.request([hdr(T_IN, 1)], [512, 1], queue=1)
    assert (status, bufs) == (S_OK, [sector(1)])


def raw_request(blk: Blk, descs: list[tuple[int, int, int]]) -> None:
    """A request of raw (address, length, flags) buffers, addresses unchecked."""
    drv = blk.drivers[0]
    if isinstance(drv, MockPackedDriverQueue):
        drv.add(
            [(a, n) for a, n, f in descs if not f & VIRTQ_DESC_F_WRITE],
            [(a, n) for a, n, f in descs if f & VIRTQ_DESC_F_WRITE],
        )
        drv.publish()
        return
    indices = list(range(len(descs)))
    for i, (addr, length, flags) in enumerate(descs):
        last = i == len(descs) - 1
        drv.write_desc(i, addr, length, flags | (0 if last else VIRTQ_DESC_F_NEXT), i + 1)
    drv.push_avail(indices[0])
    drv.publish()


@pytest.mark.parametrize("bad", [0, 1 << 40, (1 << 64) - 256])
def test_buffer_outside_memory_is_an_ioerr(blk: Blk, bad: int) -> None:
    g = blk.guest
    header = g.put(hdr(T_IN, 0))
    status = g.alloc(1)
    g.write(status, b"\xee")
    raw_request(blk, [(header, 16, 0), (bad, 512, VIRTQ_DESC_F_WRITE), (status, 1, 2)])
    blk.device.process(0)
    assert g.read(status, 1) == bytes([S_IOERR])
    # Header outside memory.
    raw_request(blk, [(bad, 16, 0), (status, 1, VIRTQ_DESC_F_WRITE)])
    g.write(status, b"\xee")
    blk.device.process(0)
    assert g.read(status, 1) == bytes([S_IOERR])
    # A write whose data is outside memory.
    header = g.put(hdr(T_OUT, 0))
    raw_request(blk, [(header, 16, 0), (bad, 512, 0), (status, 1, VIRTQ_DESC_F_WRITE)])
    blk.device.process(0)
    assert g.read(status, 1) == bytes([S_IOERR])
    assert image_bytes(blk.device, 0, 512) == sector(0)


def test_status_outside_memory_is_a_queue_error(blk: Blk) -> None:
    header = blk.guest.put(hdr(T_IN, 0))
    raw_request(blk, [(header, 16, 0), (1 << 40, 1, VIRTQ_DESC_F_WRITE)])
    with pytest.raises(QueueError):
        blk.device.process(0)


def test_multiqueue(make_blk: MakeBlk) -> None:
    blk = Blk(make_blk(num_queues=4))
    assert struct.unpack_from("<H", blk.device.read_config(), 34) == (4,)
    for q in range(4):
        blk.drivers[q].send([hdr(T_OUT, 40 + q), bytes([q]) * 512], [1])
    for q in (3, 1, 0, 2):
        blk.device.process(q)
    for q in range(4):
        [(_, length, [status])] = blk.drivers[q].receive()
        assert (length, status) == (1, bytes([S_OK]))
        assert image_bytes(blk.device, (40 + q) * 512, 512) == bytes([q]) * 512
    assert sorted(blk.interrupts) == [0, 1, 2, 3]


def test_many_requests_in_one_kick_signal_once(blk: Blk) -> None:
    drv = blk.drivers[0]
    for i in range(20):
        drv.send([hdr(T_IN, i)], [512, 1])
    blk.device.process(0)
    got = drv.receive()
    assert [bufs[0] for _, _, bufs in got] == [sector(i) for i in range(20)]
    assert blk.interrupts == [0]


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_queues": 0},
        {"num_queues": 65},
        {"queue_size": 100},
        {"queue_size": 2},
        {"serial": "x" * 21},
        {"logical_block_size": 1000},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BlkConfig("img", **kwargs)  # type: ignore[arg-type]


def test_open_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot open"):
        open_image(str(tmp_path / "missing"), False)
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(1000))
    with pytest.raises(ValueError, match="multiple of 512"):
        open_image(str(odd), False)
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(ValueError):
        open_image(str(empty), False)
    with pytest.raises(ValueError):
        open_image(str(tmp_path), True)


def test_zero_length_requests(blk: Blk) -> None:
    # The null request (what `pvbus bench notify` times): it succeeds and moves nothing, at
    # any sector up to the capacity; past it the range check still fails it.
    assert blk.simple(T_IN, 5) == (S_OK, b"")
    assert blk.simple(T_OUT, SECTORS) == (S_OK, b"")
    assert blk.simple(T_IN, SECTORS + 1)[0] == S_IOERR
    assert image_bytes(blk.device, 5 * 512, 512) == sector(5)
    assert blk.interrupts == [0, 0, 0]


def test_io_threads_option(image: Path) -> None:
    parser = argparse.ArgumentParser()
    blk_cli.add_arguments(parser)
    device = blk_cli.make_device(parser.parse_args(["--image", str(image), "--io-threads", "0"]))
    try:
        assert device.config.io_threads == 0
    finally:
        device.close()
    default = blk_cli.make_device(parser.parse_args(["--image", str(image)]))
    default.close()
    assert default.config.io_threads == 2
    with pytest.raises(ValueError, match="io-threads 65"):
        blk_cli.make_device(parser.parse_args(["--image", str(image), "--io-threads", "65"]))
