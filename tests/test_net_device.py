"""virtio-net device model on a fake guest: frames both ways, control queue, malformed chains.

The backend is a real ``SOCK_SEQPACKET`` socket pair; the reactor is a recorder the test
drives by hand, so nothing here depends on timing.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from unittest import mock

import pytest

from pvbus.devices.net import (
    CTRL_ERR,
    CTRL_OK,
    LoopbackBackend,
    NetBackend,
    NetConfig,
    NetDevice,
    SeqpacketBackend,
)
from pvbus.devices.net.backends import BackendClosedError
from pvbus.devices.net.device import (
    F_CTRL_MAC_ADDR,
    F_CTRL_RX,
    F_CTRL_RX_EXTRA,
    F_CTRL_VQ,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_STATUS,
)
from pvbus.devices.net.frames import HDR_LEN, MAX_FRAME, NET_HDR, format_mac, parse_mac
from pvbus.testing import FakeGuest, MockDriverQueue, MockPackedDriverQueue, mock_queue
from pvbus.virtio import split
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.constants import F_EVENT_IDX, F_RING_PACKED, F_VERSION_1, bit
from pvbus.virtio.errors import QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.queue import Virtqueue
from pvbus.virtio.split import SplitQueue


@pytest.fixture(autouse=True, params=["c", "python"] if split.FAST_RING else ["python"])
def ring_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test with the split ring's C loop (where built) and with its Python twin."""
    if request.param == "c":
        yield "c"
    else:
        with mock.patch.object(split, "_fastring", None):
            yield "python"


MAC = parse_mac("52:54:00:00:00:01")
PEER = parse_mac("52:54:00:00:00:02")


class Reactor:
    """Records readers; the test calls :meth:`fire` where an event loop would."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        raise AssertionError("not used")

    def fire(self) -> None:
        for callback in list(self.readers.values()):
            callback()


class CountingQueue(SplitQueue):
    """A device queue that records how many chains each used-index update returned."""

    __slots__ = ("_counted", "publishes")

    def __init__(self, twin: Virtqueue) -> None:
        super().__init__(twin.max_size)
        for name in ("size", "desc_addr", "avail_addr", "used_addr", "ready", "event_idx"):
            setattr(self, name, getattr(twin, name))
        self.next_avail, self.next_used = twin.next_avail, twin.next_used
        self.publishes: list[int] = []
        self._counted = False

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        self.publishes.append(1)
        super().add_used(mem, head, length)

    def add_used_many(self, mem: GuestMemory, entries: list[tuple[int, int]]) -> None:
        if not self._counted:
            self.publishes.append(len(entries))
        super().add_used_many(mem, entries)

    def add_used_heads(self, mem: GuestMemory, heads: bytes, length: int = 0) -> None:
        self.publishes.append(len(heads) // 2)
        self._counted = True  # the Python twin goes through add_used_many
        try:
            super().add_used_heads(mem, heads, length)
        finally:
            self._counted = False


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


class Rig:
    """A device with its queues on mock driver queues and a socket-pair backend."""

    def __init__(
        self,
        config: NetConfig,
        features: int | None = None,
        *,
        event_idx: bool = False,
        queue_size: int = 64,
        backend: NetBackend | None = None,
        packed: bool = False,
    ) -> None:
        self.guest = FakeGuest(4 << 20)
        self.peer, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setblocking(False)
        self.dev = NetDevice(config, SeqpacketBackend(theirs) if backend is None else backend)
        self.dev.mem = self.guest.mem
        self.reactor = Reactor()
        self.dev.reactor = self.reactor
        self.interrupts: list[int] = []
        self.dev.interrupt = self.interrupts.append
        if features is None:
            features = self.dev.device_features()
        if not event_idx:
            features &= ~bit(F_EVENT_IDX)
        features = features | bit(F_RING_PACKED) if packed else features & ~bit(F_RING_PACKED)
        self.dev.set_features(features)
        self.q: list[MockDriverQueue | MockPackedDriverQueue] = []
        for i in range(self.dev.num_queues):
            mq = mock_queue(self.guest, queue_size, event_idx=event_idx, packed=packed)
            self.dev.queues[i] = mq.device_queue
            self.q.append(mq)
        for i in range(self.dev.num_queues):
            self.dev.queue_started(i)

    def close(self) -> None:
        self.dev.close()
        self.peer.close()

    def transmit(self, data: bytes, index: int = 1, *, hdr: bytes | None = None) -> None:
        header = bytes(HDR_LEN) if hdr is None else hdr
        self.q[index].send([header + data])
        self.dev.process(index)

    def peer_frames(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out

    def post_rx(self, sizes: list[int], index: int = 0) -> None:
        for size in sizes:
            self.q[index].send([], [size], publish=False)
        self.q[index].publish()

    def received(self, index: int = 0) -> list[tuple[bytes, bytes]]:
        """(header, frame) of each frame received on rx queue ``index``, merged buffers joined."""
        out: list[tuple[bytes, bytes]] = []
        used = self.q[index].receive()
        i = 0
        while i < len(used):
            _, length, bufs = used[i]
            data = b"".join(bufs)[:length]
            num = NET_HDR.unpack_from(data)[6] if self.dev.hdr_len == HDR_LEN else 1
            for _, more_len, more in used[i + 1 : i + num]:
                data += b"".join(more)[:more_len]
            out.append((data[: self.dev.hdr_len], data[self.dev.hdr_len :]))
            i += max(num, 1)
        return out


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(NetConfig(mac=MAC))
    yield r
    r.close()


def test_features_and_config() -> None:
    dev = NetDevice(NetConfig(mac=MAC, queue_pairs=4))
    features = dev.device_features()
    for f in (F_MAC, F_STATUS, F_MRG_RXBUF, F_CTRL_VQ, F_CTRL_RX, F_MQ, F_VERSION_1):
        assert features & bit(f), f
    assert not features & 0b11  # no checksum offloads
    assert dev.num_queues == 9 and dev.ctrl_index == 8
    mac, status, pairs = struct.unpack_from("<6sHH", dev.read_config())
    assert (mac, status, pairs) == (MAC, 0, 4)  # no backend: link down
    single = NetDevice(NetConfig(mac=MAC, mrg_rxbuf=False, ctrl_vq=False))
    assert not single.device_features() & (bit(F_MQ) | bit(F_CTRL_VQ) | bit(F_MRG_RXBUF))
    assert single.num_queues == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mac": b"\x01\x02\x03\x04\x05\x06"},
        {"queue_pairs": 0},
        {"queue_size": 100},
        {"queue_pairs": 2, "ctrl_vq": False},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        NetConfig(**kwargs)  # type: ignore[arg-type]


def test_mac_parsing() -> None:
    assert format_mac(parse_mac("52-54-00-ab-cd-ef")) == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00:ab:cd", "zz:54:00:ab:cd:ef", "01:00:5e:00:00:01"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def test_link_up_with_backend(rig: Rig) -> None:
    assert struct.unpack_from("<6sH", rig.dev.read_config())[1] == 1


@pytest.mark.parametrize("event_idx", [False, True])
def test_transmit_reaches_backend(event_idx: bool) -> None:
    rig = Rig(NetConfig(mac=MAC), event_idx=event_idx)
    try:
        frames = [frame(PEER, MAC, bytes([i]) * (60 + i * 100)) for i in range(5)]
        for f in frames:
            rig.q[1].send([bytes(HDR_LEN), f[:20], f[20:]], publish=False)
        rig.q[1].publish()
        rig.dev.process(1)
        assert rig.peer_frames() == frames
        used = rig.q[1].receive()
        assert len(used) == 5 and all(length == 0 for _, length, _ in used)
        assert rig.interrupts == [1]
        assert rig.dev.stats.tx_frames == 5
    finally:
        rig.close()


def test_transmit_header_split_across_buffers(rig: Rig) -> None:
    f = frame(PEER, MAC, b"x" * 50)
    rig.q[1].send([bytes(5), bytes(7) + f[:3], f[3:]])
    rig.dev.process(1)
    assert rig.peer_frames() == [f]


def test_receive_into_buffers(rig: Rig) -> None:
    rig.post_rx([2048] * 4)
    frames = [frame(MAC, PEER, bytes([i]) * 100) for i in range(3)]
    for f in frames:
        rig.peer.send(f)
    rig.reactor.fire()
    got = rig.received()
    assert [f for _, f in got] == frames
    for header, _ in got:
        assert NET_HDR.unpack(header) == (0, 0, 0, 0, 0, 0, 1)
    assert rig.interrupts == [0]


def test_receive_merges_small_buffers(rig: Rig) -> None:
    rig.post_rx([500] * 8)
    big = frame(MAC, PEER, bytes(range(256)) * 5)  # 1294 bytes + header: three buffers
    rig.peer.send(big)
    counting = CountingQueue(rig.dev.queues[0])
    rig.dev.queues[0] = counting
    rig.reactor.fire()
    assert counting.publishes == [3]  # one used-index update for the whole frame
    used = rig.q[0].receive()
    assert len(used) == 3
    assert NET_HDR.unpack_from(used[0][2][0])[6] == 3
    data = b"".join(b"".join(bufs)[:length] for _, length, bufs in used)
    assert data[HDR_LEN:] == big


def test_receive_without_mrg_rxbuf_needs_big_buffers() -> None:
    rig = Rig(NetConfig(mac=MAC, mrg_rxbuf=False))
    try:
        assert not rig.dev.mrg_rxbuf
        rig.post_rx([200, 2048])
        rig.peer.send(frame(MAC, PEER, b"a" * 1000))  # does not fit the first chain: dropped
        rig.peer.send(frame(MAC, PEER, b"b" * 100))  # fits it
        rig.reactor.fire()
        got = rig.received()
        assert [f[14:15] for _, f in got] == [b"b"]
        assert rig.dev.stats.rx_dropped == 1
    finally:
        rig.close()


def test_legacy_header_without_version_1() -> None:
    config = NetConfig(mac=MAC, mrg_rxbuf=False)
    dev_features = NetDevice(config).device_features() & ~bit(F_VERSION_1)
    rig = Rig(config, dev_features & ~bit(F_MRG_RXBUF))
    try:
        assert rig.dev.hdr_len == 10
        f = frame(PEER, MAC, b"z" * 46)
        rig.q[1].send([bytes(10) + f])
        rig.dev.process(1)
        assert rig.peer_frames() == [f]
        rig.post_rx([2048])
        rig.peer.send(f)
        rig.reactor.fire()
        ((_, length, bufs),) = rig.q[0].receive()
        assert length == 10 + len(f) and bufs[0][10:length] == f
    finally:
        rig.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_backpressure_keeps_frames_until_buffers_arrive(event_idx: bool) -> None:
    rig = Rig(NetConfig(mac=MAC), event_idx=event_idx)
    try:
        frames = [frame(MAC, PEER, bytes([i]) * 64) for i in range(6)]
        for f in frames:
            rig.peer.send(f)
        rig.post_rx([2048] * 2)
        rig.reactor.fire()
        assert [f for _, f in rig.received()] == frames[:2]
        assert not rig.reactor.readers  # the device stopped reading the backend
        rig.post_rx([2048] * 8)
        rig.dev.process(0)  # the driver's kick
        assert [f for _, f in rig.received()] == frames[2:]
        assert rig.reactor.readers  # reading again
        assert rig.dev.stats.rx_frames == 6 and rig.dev.stats.rx_dropped == 0
    finally:
        rig.close()


def test_rx_with_readable_chain_is_completed_empty(rig: Rig) -> None:
    rig.q[0].send([b"oops"], [64])  # wrong direction for a receive queue
    rig.post_rx([2048])
    f = frame(MAC, PEER, b"q" * 40)
    rig.peer.send(f)
    rig.reactor.fire()
    used = rig.q[0].receive()
    assert [length for _, length, _ in used] == [0, HDR_LEN + len(f)]
    assert rig.dev.stats.rx_errors == 1


@pytest.mark.parametrize(
    ("readable", "writable"),
    [
        ([b"\0" * 4], []),  # shorter than the header
        ([bytes(HDR_LEN) + b"short"], []),  # frame shorter than an Ethernet header
        ([bytes(HDR_LEN) + frame(PEER, MAC, b"x" * 50)], [16]),  # writable buffer on tx
        ([b"\x01" + bytes(HDR_LEN - 1) + frame(PEER, MAC, b"x" * 50)], []),  # NEEDS_CSUM
        ([b"\x00\x01" + bytes(HDR_LEN - 2) + frame(PEER, MAC, b"x" * 50)], []),  # GSO
    ],
)
def test_malformed_transmit_is_dropped_not_fatal(
    rig: Rig, readable: list[bytes], writable: list[int]
) -> None:
    rig.q[1].send(readable, writable)
    good = frame(PEER, MAC, b"good" * 20)
    rig.q[1].send([bytes(HDR_LEN) + good])
    rig.dev.process(1)
    assert rig.peer_frames() == [good]
    assert len(rig.q[1].receive()) == 2
    assert rig.dev.stats.tx_errors == 1 and rig.dev.stats.tx_frames == 1


def test_transmit_with_bad_address_is_counted(rig: Rig) -> None:
    rig.q[1].add([(0xDEAD0000, 100)], [])
    rig.q[1].publish()
    rig.dev.process(1)
    assert rig.dev.stats.tx_errors == 1
    assert len(rig.q[1].get_used()) == 1


def test_broken_ring_raises_queue_error(rig: Rig) -> None:
    q = rig.q[1]
    assert isinstance(q, MockDriverQueue)
    q.write_desc(0, rig.guest.put(bytes(64)), 64, 1, 0)  # NEXT to itself: a loop
    q.push_avail(0)
    q.publish()
    with pytest.raises(QueueError):
        rig.dev.process(1)


def control(rig: Rig, request: bytes, ack_room: int = 1) -> int:
    ctrl = rig.dev.ctrl_index
    rig.q[ctrl].send([request[:2], request[2:]] if len(request) > 2 else [request], [ack_room])
    rig.dev.process(ctrl)
    ((_, length, bufs),) = rig.q[ctrl].receive()
    assert length == 1
    return bufs[-1][-1]


def test_rx_filter_via_control_queue(rig: Rig) -> None:
    other = parse_mac("52:54:00:00:00:99")
    mcast = bytes.fromhex("01005e000001")
    assert control(rig, bytes([0, 0, 0])) == CTRL_OK  # promisc off
    table = struct.pack("<I", 1) + other + struct.pack("<I", 1) + mcast
    assert control(rig, bytes([1, 0]) + table) == CTRL_OK
    rig.post_rx([2048] * 8)
    sent = [
        frame(MAC, PEER, b"1" * 50),  # ours
        frame(parse_mac("52:54:00:00:00:77"), PEER, b"2" * 50),  # someone else's: filtered
        frame(other, PEER, b"3" * 50),  # in the unicast table
        frame(b"\xff" * 6, PEER, b"4" * 50),  # broadcast
        frame(mcast, PEER, b"5" * 50),  # in the multicast table
        frame(bytes.fromhex("01005e000002"), PEER, b"6" * 50),  # other multicast: filtered
    ]
    for f in sent:
        rig.peer.send(f)
    rig.reactor.fire()
    assert [f[14:15] for _, f in rig.received()] == [b"1", b"3", b"4", b"5"]
    assert rig.dev.stats.rx_filtered == 2
    assert control(rig, bytes([0, 5, 1])) == CTRL_OK  # nobcast
    assert control(rig, bytes([0, 1, 1])) == CTRL_OK  # allmulti
    for f in sent[3:]:
        rig.peer.send(f)
    rig.reactor.fire()
    assert [f[14:15] for _, f in rig.received()] == [b"5", b"6"]


def test_mac_addr_set(rig: Rig) -> None:
    new = parse_mac("52:54:00:00:00:42")
    assert rig.dev.acked_features & bit(F_CTRL_MAC_ADDR)
    assert control(rig, bytes([1, 1]) + new) == CTRL_OK
    assert rig.dev.read_config()[:6] == new
    assert control(rig, bytes([1, 1]) + b"\x01" * 6) == CTRL_ERR  # multicast


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"",  # nothing at all
        b"\x00",  # class only
        bytes([0, 0]),  # RX mode without its byte
        bytes([0, 9, 1]),  # unknown RX command
        bytes([1, 0]) + struct.pack("<I", 5),  # table shorter than it says
        bytes([1, 0]) + struct.pack("<II", 0, 0) + b"junk",  # trailing bytes
        bytes([4, 0]) + struct.pack("<H", 2),  # MQ not negotiated (one pair)
        bytes([2, 0, 0, 0]),  # VLAN: not offered
        bytes([99, 0]),
    ],
)
def test_bad_control_commands_get_err(rig: Rig, request_bytes: bytes) -> None:
    assert control(rig, request_bytes) == CTRL_ERR
    assert rig.dev.stats.ctrl_errors == 1


def test_rx_extra_needs_its_feature() -> None:
    config = NetConfig(mac=MAC)
    features = NetDevice(config).device_features() & ~bit(F_CTRL_RX_EXTRA)
    rig = Rig(config, features)
    try:
        assert control(rig, bytes([0, 5, 1])) == CTRL_ERR
        assert control(rig, bytes([0, 1, 1])) == CTRL_OK
    finally:
        rig.close()


def test_control_without_ack_room_is_a_queue_error(rig: Rig) -> None:
    ctrl = rig.dev.ctrl_index
    rig.q[ctrl].send([bytes([0, 0, 1])])
    with pytest.raises(QueueError):
        rig.dev.process(ctrl)


def test_multiqueue_steers_flows_back_to_their_pair() -> None:
    rig = Rig(NetConfig(mac=MAC, queue_pairs=2))
    try:
        assert control(rig, bytes([4, 0]) + struct.pack("<H", 2)) == CTRL_OK
        assert control(rig, bytes([4, 0]) + struct.pack("<H", 3)) == CTRL_ERR
        assert rig.dev.active_pairs == 2
        ip = bytes.fromhex("4500001c000000004011" + "0000" + "a9fe0001" + "a9fe0002")
        ports = struct.pack(">HH", 1000, 2000) + bytes(4)
        out = frame(PEER, MAC, ip + ports, 0x0800)
        rig.transmit(out, index=3)  # the flow leaves on pair 1
        assert rig.peer_frames() == [out]
        back_ip = ip[:12] + ip[16:20] + ip[12:16]
        back = frame(MAC, PEER, back_ip + struct.pack(">HH", 2000, 1000) + bytes(4), 0x0800)
        rig.post_rx([2048], 0)
        rig.post_rx([2048], 2)
        rig.peer.send(back)
        rig.reactor.fire()
        assert rig.received(0) == []
        assert [f for _, f in rig.received(2)] == [back]
    finally:
        rig.close()


def test_reset_restores_filter_and_stops_reading(rig: Rig) -> None:
    assert control(rig, bytes([0, 0, 0])) == CTRL_OK
    assert rig.reactor.readers
    rig.dev.reset()
    assert rig.dev.promisc and not rig.reactor.readers
    assert rig.dev.mac == MAC


def test_backend_gone_means_link_down(rig: Rig) -> None:
    rig.peer.close()
    rig.reactor.fire()
    assert rig.dev.backend is None and not rig.reactor.readers
    assert struct.unpack_from("<6sH", rig.dev.read_config())[1] == 0
    rig.transmit(frame(PEER, MAC, b"x" * 50))
    assert rig.dev.stats.tx_dropped == 1


# -- the transmit burst and its fast path --------------------------------------------------


def test_transmit_burst_publishes_used_once_per_burst() -> None:
    rig = Rig(NetConfig(mac=MAC), queue_size=128)
    try:
        counting = CountingQueue(rig.dev.queues[1])
        rig.dev.queues[1] = counting
        frames = [frame(PEER, MAC, i.to_bytes(2, "big") * 30) for i in range(100)]
        for f in frames:
            rig.q[1].send([bytes(HDR_LEN) + f], publish=False)  # one buffer: the fast path
        rig.q[1].publish()
        rig.dev.process(1)
        assert rig.peer_frames() == frames
        assert counting.publishes == [100]  # pop_frames: one burst, one used-index update
        used = rig.q[1].receive()
        assert len(used) == 100 and all(length == 0 for _, length, _ in used)
        assert rig.interrupts == [1]
        assert rig.dev.stats.tx_frames == 100
        assert rig.dev.stats.tx_bytes == sum(len(f) for f in frames)
    finally:
        rig.close()


def test_malformed_frames_in_a_fast_path_burst_are_counted_and_completed(rig: Rig) -> None:
    good = [frame(PEER, MAC, bytes([i]) * 50) for i in range(6)]
    bad_chains: list[tuple[list[bytes], list[int]]] = [
        ([bytes(HDR_LEN - 1)], []),  # one buffer shorter than a header
        ([bytes(HDR_LEN) + b"short"], []),  # frame shorter than an Ethernet header
        ([b"\x01" + bytes(HDR_LEN - 1) + good[0]], []),  # NEEDS_CSUM
        ([b"\x00\x04" + bytes(HDR_LEN - 2) + good[0]], []),  # GSO_TCPV6
        ([], [HDR_LEN + 60]),  # one device-writable buffer on a transmit queue
    ]
    for g, (readable, writable) in zip(good, bad_chains, strict=False):
        rig.q[1].send([bytes(HDR_LEN) + g], publish=False)
        rig.q[1].send(readable, writable, publish=False)
    rig.q[1].add([(0xDEAD0000, 100)], [])  # one buffer outside guest memory
    rig.q[1].send([bytes(HDR_LEN) + good[5]], publish=False)
    rig.q[1].publish()
    rig.dev.process(1)
    assert rig.peer_frames() == good
    used = rig.q[1].get_used()
    assert len(used) == 12 and all(length == 0 for _, length in used)
    stats = rig.dev.stats
    assert (stats.tx_frames, stats.tx_errors, stats.tx_dropped) == (6, 6, 0)


def test_too_big_frame_in_one_buffer_is_a_tx_error(rig: Rig) -> None:
    huge = frame(PEER, MAC, bytes(MAX_FRAME - 14 + 1))  # one byte over
    rig.q[1].send([bytes(HDR_LEN) + huge])
    rig.transmit(frame(PEER, MAC, b"ok" * 30))
    assert len(rig.peer_frames()) == 1
    assert rig.dev.stats.tx_errors == 1 and rig.dev.stats.tx_frames == 1


def test_broken_chain_mid_burst_comes_after_the_chains_before_it(rig: Rig) -> None:
    q = rig.q[1]
    assert isinstance(q, MockDriverQueue)
    before = [frame(PEER, MAC, bytes([i]) * 40) for i in range(3)]
    for f in before:
        q.send([bytes(HDR_LEN) + f], publish=False)
    q.write_desc(60, rig.guest.put(bytes(64)), 64, 1, 60)  # NEXT to itself: a loop
    q.push_avail(60)
    q.send([bytes(HDR_LEN) + frame(PEER, MAC, b"after" * 10)], publish=False)
    q.publish()
    with pytest.raises(QueueError, match="loop"):
        rig.dev.process(1)
    # The chains before the broken one were sent and returned before the error.
    assert rig.peer_frames() == before
    assert len(q.get_used()) == 3
    assert rig.dev.queues[1].next_avail == 4  # the broken chain is taken, as pop() takes it


def test_backend_gone_mid_burst_drops_the_rest(rig: Rig) -> None:
    rig.peer.close()
    for i in range(3):
        rig.q[1].send([bytes(HDR_LEN) + frame(PEER, MAC, bytes([i]) * 50)], publish=False)
    rig.q[1].publish()
    rig.dev.process(1)
    assert rig.dev.backend is None
    assert rig.dev.stats.tx_dropped == 3 and rig.dev.stats.tx_frames == 0
    assert len(rig.q[1].get_used()) == 3


def test_legacy_header_fast_path() -> None:
    config = NetConfig(mac=MAC, mrg_rxbuf=False)
    features = NetDevice(config).device_features() & ~bit(F_VERSION_1) & ~bit(F_MRG_RXBUF)
    rig = Rig(config, features)
    try:
        f = frame(PEER, MAC, b"l" * 46)
        rig.q[1].send([bytes(10) + f], publish=False)
        rig.q[1].send([b"\x01" + bytes(9) + f], publish=False)  # NEEDS_CSUM
        rig.q[1].publish()
        rig.dev.process(1)
        assert rig.peer_frames() == [f]
        assert rig.dev.stats.tx_errors == 1 and rig.dev.stats.tx_bytes == len(f)
    finally:
        rig.close()


def test_pop_burst_entries() -> None:
    guest = FakeGuest()
    mq = MockDriverQueue(guest, 16)
    queue = mq.device_queue
    mem = guest.mem
    assert queue.pop_burst(mem, 8) == []
    one = mq.send([b"a" * 20], publish=False)
    two = mq.send([b"b" * 4, b"c" * 6], publish=False)
    ind = mq.send([b"d" * 8], indirect=True, publish=False)
    wr = mq.send([], [32], publish=False)
    mq.publish()
    burst = queue.pop_burst(mem, 3)
    assert [entry[0] for entry in burst] == [one, two, ind]
    head, addr, length, chain = burst[0]
    assert chain is None and length == 20 and guest.read(addr, length) == b"a" * 20
    assert burst[1][1:3] == (0, 0) and burst[1][3] is not None
    assert [n for _, n in burst[1][3].readable] == [4, 6]
    assert burst[2][3] is not None and burst[2][3].readable_len == 8  # indirect: walked
    ((head, _, length, chain),) = queue.pop_burst(mem, 8)
    assert head == wr and chain is not None and chain.writable_len == 32  # not asked for
    assert queue.pop_burst(mem, 8) == []
    wr2 = mq.send([], [48])
    ((head, _, length, chain),) = queue.pop_burst(mem, 8, write=True)
    assert (head, length, chain) == (wr2, 48, None)


def test_pop_burst_raises_like_pop_when_the_first_chain_is_broken() -> None:
    guest = FakeGuest()
    mq = MockDriverQueue(guest, 16)
    queue = mq.device_queue
    mq.push_avail(16)  # head outside the queue
    mq.publish()
    with pytest.raises(QueueError, match="outside"):
        queue.pop_burst(guest.mem, 8)
    assert queue.next_avail == 1
    mq.avail_idx = 40
    mq.publish()
    with pytest.raises(QueueError, match="ahead"):
        queue.pop_burst(guest.mem, 8)


def test_loopback_takes_a_burst_in_ring_order_and_drops_what_does_not_fit() -> None:
    rig = Rig(NetConfig(mac=MAC), backend=LoopbackBackend(limit=5), queue_size=128)
    try:
        sent = [frame(MAC, PEER, bytes([i]) * 50) for i in range(7)]
        q = rig.q[1]
        q.send([bytes(HDR_LEN) + sent[0]], publish=False)
        q.send([bytes(HDR_LEN) + sent[1]], publish=False)
        q.send([bytes(HDR_LEN), sent[2]], publish=False)  # two buffers: not the fast path
        q.send([b"\x01" + bytes(HDR_LEN - 1) + sent[0]], publish=False)  # NEEDS_CSUM
        for f in sent[3:]:
            q.send([bytes(HDR_LEN) + f], publish=False)
        q.publish()
        rig.dev.process(1)
        assert len(q.get_used()) == 8
        stats = rig.dev.stats
        assert (stats.tx_frames, stats.tx_dropped, stats.tx_errors) == (5, 2, 1)
        assert stats.tx_bytes == sum(len(f) for f in sent[:5])
        rig.post_rx([2048] * 8)
        rig.reactor.fire()
        assert [f for _, f in rig.received()] == sent[:5]
    finally:
        rig.close()


def test_loopback_send_burst() -> None:
    backend = LoopbackBackend(limit=3)
    try:
        assert backend.send_burst([]) == 0
        assert backend.send_burst([b"a" * 20, memoryview(b"b" * 30)]) == 2
        assert backend.send_burst([b"c" * 40, b"d" * 50]) == 1
        assert backend.send_burst([b"e" * 60]) == 0
        buf = memoryview(bytearray(100))
        got = []
        while n := backend.recv_into(buf):
            got.append(bytes(buf[:n]))
        assert got == [b"a" * 20, b"b" * 30, b"c" * 40]
    finally:
        backend.close()


# -- the receive burst ---------------------------------------------------------------------


def test_receive_burst_publishes_used_once_per_burst() -> None:
    rig = Rig(NetConfig(mac=MAC), queue_size=128)
    try:
        rig.post_rx([2048] * 128)
        counting = CountingQueue(rig.dev.queues[0])
        rig.dev.queues[0] = counting
        frames = [frame(MAC, PEER, i.to_bytes(2, "big") * 40) for i in range(100)]
        for f in frames:
            rig.peer.send(f)
        rig.reactor.fire()
        assert counting.publishes == [64, 36]
        got = rig.received()
        assert [f for _, f in got] == frames
        assert all(NET_HDR.unpack(h) == (0, 0, 0, 0, 0, 0, 1) for h, _ in got)
        assert rig.interrupts == [0]
        assert rig.dev.stats.rx_frames == 100
        assert rig.dev.stats.rx_bytes == sum(len(f) for f in frames)
    finally:
        rig.close()


def test_receive_burst_falls_back_in_order() -> None:
    """Frames that fit, one that needs merged buffers, then more that fit: in ring order."""
    rig = Rig(NetConfig(mac=MAC), queue_size=128)
    try:
        rig.post_rx([600] * 16)
        frames = [frame(MAC, PEER, bytes([i]) * (1000 if i == 2 else 100)) for i in range(5)]
        for f in frames:
            rig.peer.send(f)
        rig.reactor.fire()
        assert [f for _, f in rig.received()] == frames
        assert rig.dev.stats.rx_frames == 5 and rig.dev._rx_fast
    finally:
        rig.close()


def test_malformed_receive_chain_mid_burst(rig: Rig) -> None:
    rig.post_rx([2048] * 2)
    rig.q[0].send([b"oops"], [64])  # a readable buffer on a receive queue
    rig.post_rx([2048] * 3)
    frames = [frame(MAC, PEER, bytes([i]) * 60) for i in range(5)]
    for f in frames:
        rig.peer.send(f)
    rig.reactor.fire()
    used = rig.q[0].receive()
    assert [length for _, length, _ in used] == [HDR_LEN + 74] * 2 + [0] + [HDR_LEN + 74] * 3
    assert rig.dev.stats.rx_errors == 1 and rig.dev.stats.rx_frames == 5
    assert not rig.dev._rx_fast  # that driver posts other layouts: the general path from now
    rig.post_rx([2048])
    rig.peer.send(frames[0])
    rig.reactor.fire()
    assert [f for _, f in rig.received()] == [frames[0]]
    rig.dev.reset()
    assert rig.dev._rx_fast


def test_receive_chains_of_several_buffers(rig: Rig) -> None:
    for _ in range(3):
        rig.q[0].send([], [HDR_LEN, 1500])  # header and data apart, as without MRG_RXBUF
    frames = [frame(MAC, PEER, bytes([i]) * 80) for i in range(3)]
    for f in frames:
        rig.peer.send(f)
    rig.reactor.fire()
    assert [f for _, f in rig.received()] == frames


def test_receive_buffer_outside_guest_memory(rig: Rig) -> None:
    rig.q[0].add([], [(0xDEAD0000, 2048)])
    rig.post_rx([2048])
    frames = [frame(MAC, PEER, bytes([i]) * 60) for i in range(2)]
    for f in frames:
        rig.peer.send(f)
    rig.reactor.fire()
    assert rig.dev.stats.rx_errors == 1 and rig.dev.stats.rx_frames == 1
    used = rig.q[0].get_used()
    assert [length for _, length in used] == [HDR_LEN + 74]


def test_receive_burst_with_filter_and_no_room() -> None:
    rig = Rig(NetConfig(mac=MAC))
    try:
        assert control(rig, bytes([0, 0, 0])) == CTRL_OK  # promisc off
        rig.post_rx([2048] * 2)
        mine = [frame(MAC, PEER, bytes([i]) * 60) for i in range(4)]
        rig.peer.send(frame(PEER, MAC, b"not mine" * 8))
        for f in mine:
            rig.peer.send(f)
        rig.reactor.fire()
        assert [f for _, f in rig.received()] == mine[:2]
        assert rig.dev.stats.rx_filtered == 1 and not rig.reactor.readers  # waits for room
        rig.post_rx([2048] * 4)
        rig.dev.process(0)
        assert [f for _, f in rig.received()] == mine[2:]
    finally:
        rig.close()


def test_loopback_fills_whole_buffers_then_merges_in_order() -> None:
    """The fill loop (SplitQueue.fill_batch) places frames while each fits one buffer; the
    first that needs merged buffers goes the general way, and order holds across both."""
    rig = Rig(NetConfig(mac=MAC), backend=LoopbackBackend(limit=100), queue_size=128)
    try:
        sent = [frame(MAC, PEER, bytes([i]) * 100) for i in range(10)]
        for f in sent:
            rig.q[1].send([bytes(HDR_LEN) + f], publish=False)
        rig.q[1].publish()
        rig.dev.process(1)
        # Four big buffers, then small ones a frame needs two of, then big ones again.
        rig.post_rx([2048] * 4 + [64] * 6 + [2048] * 8)
        rig.reactor.fire()
        got = rig.received()
        assert [f for _, f in got] == sent
        assert [NET_HDR.unpack(h)[-1] for h, _ in got] == [1] * 4 + [2] * 3 + [1] * 3
        stats = rig.dev.stats
        assert (stats.rx_frames, stats.rx_bytes) == (10, sum(map(len, sent)))
        assert rig.interrupts.count(0) >= 1
    finally:
        rig.close()


def test_loopback_keeps_batches_in_order_up_to_its_limit() -> None:
    backend = LoopbackBackend(limit=5)
    try:
        assert backend.peek_batch() is None and backend.waiting() == []
        assert backend.send_burst([b"a" * 20, b"b" * 20, b"c" * 20]) == 3
        assert backend.send_batch(FrameBatch.of([b"d" * 9, b"e" * 9, b"f" * 9])) == 2  # full
        assert backend.send([b"g"]) is False and len(backend) == 5
        batch, start = backend.peek_batch() or (FrameBatch(b"", b""), -1)
        assert (batch.frames(), start) == ([b"a" * 20, b"b" * 20, b"c" * 20], 0)
        backend.consume(2)
        batch, start = backend.peek_batch() or (FrameBatch(b"", b""), -1)
        assert (batch.frame(start), start) == (b"c" * 20, 2)
        backend.consume(2)  # across the two batches
        assert backend.waiting() == [b"e" * 9]
        buf = memoryview(bytearray(64))
        assert backend.recv_into(buf) == 9 and buf[:9] == b"e" * 9
        assert backend.recv_into(buf) == 0 and len(backend) == 0
    finally:
        backend.close()


def test_loopback_frames_wait_in_the_backend_until_buffers_come() -> None:
    backend = LoopbackBackend(limit=100)
    rig = Rig(NetConfig(mac=MAC), backend=backend, queue_size=128)
    try:
        sent = [frame(MAC, PEER, bytes([i]) * 80) for i in range(6)]
        for f in sent:
            rig.q[1].send([bytes(HDR_LEN) + f], publish=False)
        rig.q[1].publish()
        rig.dev.process(1)
        rig.post_rx([2048] * 2)
        rig.reactor.fire()
        assert [f for _, f in rig.received()] == sent[:2]
        # No buffers left: the rest stay in the backend, nothing read only to be held; they
        # are copies (the driver reuses the transmit buffers), not views of guest memory.
        assert backend.waiting() == sent[2:]
        assert backend.fileno() not in rig.reactor.readers
        rig.post_rx([2048] * 8)
        rig.dev.process(0)  # the driver's kick
        assert [f for _, f in rig.received()] == sent[2:]
        assert backend.waiting() == []
        assert rig.dev.stats.rx_frames == 6
    finally:
        rig.close()


def test_seqpacket_send_burst_stops_where_the_socket_is_full() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    backend = SeqpacketBackend(ours)
    try:
        frames = [bytes([i]) * 1000 for i in range(4)]
        assert backend.send_burst(frames) == 4
        assert [theirs.recv(2000) for _ in range(4)] == frames
        sent = 0
        while (n := backend.send_burst([b"x" * 1400] * 16)) == 16:
            sent += n
        assert 0 <= n < 16  # the socket filled up part way through a burst
        theirs.close()
        with contextlib.suppress(BackendClosedError):
            while backend.send_burst([b"y" * 60]):
                pass
        with pytest.raises(BackendClosedError):
            backend.send_burst([b"z" * 60])
    finally:
        backend.close()


TAP_BURST = """
import subprocess
from pvbus.devices.net.backends import TapBackend
tap = TapBackend("pvburst0")
head = bytes(6) + bytes.fromhex("020000000001") + b"\\x88\\xb5"
frames = [head + bytes([i]) * 50 for i in range(8)]
down = tap.send_burst(frames)  # the interface is down: the first write fails, all are dropped
subprocess.run(["ip", "link", "set", "pvburst0", "up"], check=True)
up = tap.send_burst(frames)
tap.close()
print(down, up)
"""


def test_tap_send_burst_in_a_namespace(netns: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", TAP_BURST],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.split() == ["0", "8"]
