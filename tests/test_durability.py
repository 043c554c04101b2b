"""Write caching (VIRTIO 1.2 section 5.2.6.3): FLUSH completes only after fdatasync, and in
write-through mode (VIRTIO_BLK_F_CONFIG_WCE, writeback = 0) every write does too.

os.fdatasync is observed (and still called) to see that the durability point precedes the
completion the guest sees; the data itself lands in a real file.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from conftest import MakeBlk
from pvbus.devices.blk.device import S_OK, T_FLUSH, T_OUT
from pvbus.testing import MockDriverQueue
from pvbus.virtio.blk import F_CONFIG_WCE, F_FLUSH
from test_blk import Blk, image_bytes


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record fdatasync calls together with how many requests were completed at the time."""
    calls: list[int] = []
    real: Callable[[int], None] = os.fdatasync

    def observed(fd: int) -> None:
        real(fd)
        calls.append(fd)

    monkeypatch.setattr(os, "fdatasync", observed)
    return calls


def test_flush_and_cache_toggle_are_offered(make_blk: MakeBlk) -> None:
    features = make_blk().device_features()
    assert features >> F_FLUSH & 1
    assert features >> F_CONFIG_WCE & 1
    assert make_blk().read_config()[32] == 1  # writeback by default


def test_writeback_writes_sync_only_on_flush(
    make_blk: MakeBlk, monkeypatch: pytest.MonkeyPatch
) -> None:
    blk = Blk(make_blk())
    drv = blk.drivers[0]
    assert isinstance(drv, MockDriverQueue)
    seen: list[int] = []  # the used index the driver could see at each fdatasync
    real = os.fdatasync

    def observed(fd: int) -> None:
        seen.append(drv.used_idx())
        real(fd)

    monkeypatch.setattr(os, "fdatasync", observed)
    assert blk.simple(T_OUT, 3, b"a" * 512)[0] == S_OK
    assert seen == []
    drv.send([b"".join([(T_FLUSH).to_bytes(4, "little"), bytes(12)])], [1])
    blk.device.process(0)
    assert seen == [1]  # synced while only the write was complete: before the flush's entry
    [(_, _, bufs)] = drv.receive()
    assert bufs[-1] == bytes([S_OK])
    assert image_bytes(blk.device, 3 * 512, 512) == b"a" * 512


def test_write_through_syncs_every_write(make_blk: MakeBlk, syncs: list[int]) -> None:
    blk = Blk(make_blk())
    blk.device.write_config(32, b"\x00")  # the driver turns the cache off (5.2.5)
    assert blk.device.read_config()[32] == 0
    for n in range(3):
        assert blk.simple(T_OUT, n, bytes([n]) * 512)[0] == S_OK
    assert len(syncs) == 3
    blk.device.write_config(32, b"\x01")
    assert blk.simple(T_OUT, 9, b"z" * 1024)[0] == S_OK
    assert len(syncs) == 3
