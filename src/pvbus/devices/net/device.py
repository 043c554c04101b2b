"""virtio-net (VIRTIO 1.2 section 5.1): queue pairs, a control queue and a host-side backend.

Queues (5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, then controlq when
VIRTIO_NET_F_CTRL_VQ is offered. Frames carry a ``virtio_net_hdr`` (5.1.6) of 12 bytes (10 for
a legacy driver without MRG_RXBUF). No checksum or segmentation offload is offered, so every
header the device writes is zero but for ``num_buffers``, and a transmitted header that asks
for an offload is refused.

Transmit (5.1.6.2): each chain is one frame; its buffers after the header go to the backend as
a gather list straight from guest memory. Receive (5.1.6.3, 5.1.6.4): frames read from the
backend are copied into receive buffers, spread over several chains with MRG_RXBUF. When a
receive queue runs out of buffers the device keeps the frame, stops reading the backend (the
kernel queues behind it, then drops) and waits for the driver's kick.

The control queue (5.1.6.5) implements RX mode (promiscuous, all-multicast and the
CTRL_RX_EXTRA modes), the MAC filter table, MAC_ADDR_SET and MQ_VQ_PAIRS_SET. A multiqueue
device steers a received flow to the receive queue of the pair that last sent on it
(5.1.6.5.6, automatic receive steering), else by a hash of the flow.

Malformed chains never stop the device: they are counted in :attr:`NetDevice.stats`, logged
once per kind, and completed with nothing written. Only a ring that cannot be walked, or a
control request with no room for its ack, is a :class:`QueueError`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import cast

from pvbus.devices.base import COMMON_FEATURES, DRAIN_WEIGHT, VirtioDevice
from pvbus.devices.net.backends import (
    BackendClosedError,
    BatchBackend,
    BurstBackend,
    Chunk,
    NetBackend,
)
from pvbus.devices.net.frames import (
    BROADCAST,
    ETH_HLEN,
    GSO_NONE,
    HDR_LEN,
    HDR_LEN_LEGACY,
    MAX_FRAME,
    NET_HDR,
    format_mac,
    random_mac,
)
from pvbus.virtio.batch import FrameBatch
from pvbus.virtio.buffers import gather, skip
from pvbus.virtio.constants import F_VERSION_1, DeviceId, bit
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.queue import Virtqueue
from pvbus.virtio.split import DescriptorChain, Popped

__all__ = [
    "CTRL_ERR",
    "CTRL_OK",
    "NetConfig",
    "NetDevice",
    "NetStats",
]

log = logging.getLogger(__name__)

# Feature bits (section 5.1.3).
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_HOST_TSO4 = 11
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_CTRL_RX_EXTRA = 20
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23

# Status (5.1.4).
S_LINK_UP = 1

# Control classes and commands (5.1.6.5).
CTRL_RX = 0
CTRL_RX_PROMISC = 0
CTRL_RX_ALLMULTI = 1
CTRL_RX_ALLUNI = 2
CTRL_RX_NOMULTI = 3
CTRL_RX_NOUNI = 4
CTRL_RX_NOBCAST = 5
CTRL_MAC = 1
CTRL_MAC_TABLE_SET = 0
CTRL_MAC_ADDR_SET = 1
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_OK = 0
CTRL_ERR = 1

#: Largest number of queue pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX).
MAX_QUEUE_PAIRS = 0x8000
#: Most MAC filter entries kept per table (QEMU keeps 64 in all).
MAC_TABLE_ENTRIES = 64

# mac, status, max_virtqueue_pairs, mtu, speed, duplex, rss_max_key_size,
# rss_max_indirection_table_length, supported_hash_types (5.1.4).
_CONFIG = struct.Struct("<6sHHHIBBHI")
_SPEED_UNKNOWN = 0xFFFFFFFF
_DUPLEX_UNKNOWN = 0xFF
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RX_BUDGET = 256
#: Most transmit chains handled before their used entries are published.
_TX_BURST = 64
#: Frames taken at once by the common-case loops (SplitQueue.pop_frames / pop_batch).
_TX_FRAMES = 256
#: Most receive chains taken from the ring at a time.
_RX_BURST = 64
#: What NetDevice._fill_burst leaves to do: the general receive path, come back, or wait for
#: the driver's buffers.
_FILL_GENERAL, _FILL_MORE, _FILL_STARVED = range(3)
#: The header of a received frame in one buffer: no offloads, num_buffers 1 (5.1.6.4).
_RX_HEADER = NET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0, 1)
_STEERING_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class NetConfig:
    """Validated configuration of one virtio-net device."""

    mac: bytes = field(default_factory=random_mac)
    queue_pairs: int = 1
    queue_size: int = 256
    mrg_rxbuf: bool = True
    ctrl_vq: bool = True

    def __post_init__(self) -> None:
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise ValueError(f"MAC {self.mac.hex(':')} is not a unicast address")
        if not 1 <= self.queue_pairs <= 64:
            raise ValueError(f"queue-pairs {self.queue_pairs} is not in 1..64")
        if self.queue_pairs > 1 and not self.ctrl_vq:
            raise ValueError("several queue pairs need the control queue")
        qs = self.queue_size
        if qs < 4 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two in 4..32768")


@dataclass(slots=True)
class NetStats:
    """Counters of one device (frames and bytes exclude the virtio-net header)."""

    tx_frames: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # the backend had no room
    tx_errors: int = 0  # malformed transmit chains
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_filtered: int = 0  # not for us per the RX mode and MAC table
    rx_dropped: int = 0  # too big for the buffers, or no backend
    rx_errors: int = 0  # malformed receive chains
    ctrl_errors: int = 0  # control commands answered VIRTIO_NET_ERR

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NetDevice(VirtioDevice):
    """A virtio-net device model in front of one :class:`NetBackend` (or none: link down)."""

    device_id = DeviceId.NET
    name = "net"

    def __init__(self, config: NetConfig, backend: NetBackend | None = None) -> None:
        pairs = config.queue_pairs
        super().__init__(2 * pairs + (1 if config.ctrl_vq else 0), config.queue_size)
        self.config = config
        self.backend = backend
        self.pairs = pairs
        self.ctrl_index = 2 * pairs if config.ctrl_vq else -1
        self.stats = NetStats()
        self.hdr_len = HDR_LEN
        self.mrg_rxbuf = False
        self._scratch = bytearray(MAX_FRAME)
        self._scratch_view = memoryview(self._scratch)
        self._pending: bytes | None = None
        self._rx_ready: list[int] = []
        #: Receive chains have been one writable buffer each (see :meth:`_receive_burst`).
        self._rx_fast = True
        self._reading = False
        self._logged: set[str] = set()
        self._steering: dict[bytes, int] = {}
        self.ctrl_started = False
        self._init_filter()

    def _init_filter(self) -> None:
        self.mac = self.config.mac
        # Promiscuous until the driver says otherwise, as QEMU does, so a driver without
        # VIRTIO_NET_F_CTRL_RX still receives everything.
        self.promisc = True
        self.allmulti = False
        self.alluni = False
        self.nomulti = False
        self.nouni = False
        self.nobcast = False
        self.uni_table: frozenset[bytes] = frozenset()
        self.multi_table: frozenset[bytes] = frozenset()
        self.active_pairs = 1

    def close(self) -> None:
        """Stop reading and close the backend."""
        self._stop_reading()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    @property
    def link_up(self) -> bool:
        return self.backend is not None

    # -- features and config (5.1.3, 5.1.4) -------------------------------------------------

    def device_features(self) -> int:
        features = COMMON_FEATURES | bit(F_MAC) | bit(F_STATUS)
        if self.config.mrg_rxbuf:
            features |= bit(F_MRG_RXBUF)
        if self.config.ctrl_vq:
            features |= (
                bit(F_CTRL_VQ) | bit(F_CTRL_RX) | bit(F_CTRL_RX_EXTRA) | bit(F_CTRL_MAC_ADDR)
            )
            if self.pairs > 1:
                features |= bit(F_MQ)
        return features

    def set_features(self, features: int) -> None:
        super().set_features(features)
        self.mrg_rxbuf = bool(features & bit(F_MRG_RXBUF))
        modern = bool(features & bit(F_VERSION_1))
        self.hdr_len = HDR_LEN if modern or self.mrg_rxbuf else HDR_LEN_LEGACY

    def _acked(self, feature: int) -> bool:
        return bool(self.acked_features & bit(feature))

    def read_config(self) -> bytes:
        return _CONFIG.pack(
            self.mac,
            S_LINK_UP if self.link_up else 0,
            self.pairs,
            0,  # mtu: VIRTIO_NET_F_MTU not offered
            _SPEED_UNKNOWN,
            _DUPLEX_UNKNOWN,
            0,
            0,
            0,
        )

    def reset_device(self) -> None:
        self._stop_reading()
        self._pending = None
        self._rx_ready.clear()
        self._rx_fast = True
        self._steering.clear()
        self.ctrl_started = False
        self.hdr_len = HDR_LEN
        self.mrg_rxbuf = False
        self._init_filter()

    # -- queue life cycle -------------------------------------------------------------------

    def is_rx(self, index: int) -> bool:
        return index < 2 * self.pairs and index % 2 == 0

    def queue_started(self, index: int) -> None:
        if index == self.ctrl_index:
            self.ctrl_started = True
        if self.is_rx(index) and index not in self._rx_ready:
            self._rx_ready.append(index)
            self._rx_ready.sort()
            self._pump()

    def queue_stopped(self, index: int) -> None:
        if index in self._rx_ready:
            self._rx_ready.remove(index)
            if not self._rx_ready:
                self._stop_reading()

    def process(self, index: int) -> None:
        if index == self.ctrl_index:
            self.drain(index, self._handle_ctrl)
        elif index % 2:
            self.drain(index, self._handle_tx)
        else:
            # New receive buffers: deliver what waits, then read the backend again.
            self._pump()

    # -- helpers ----------------------------------------------------------------------------

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("%s (further ones only counted)", message)

    def _start_reading(self) -> None:
        if self._reading or self.backend is None or self.reactor is None:
            return
        self._reading = True
        self.reactor.add_reader(self.backend.fileno(), self._pump)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self.backend is not None and self.reactor is not None:
                self.reactor.remove_reader(self.backend.fileno())

    def _backend_failed(self, err: Exception) -> None:
        log.error("net backend failed: %s; link down", err)
        self._stop_reading()
        if self.backend is not None:
            self.backend.close()
            self.backend = None

    # -- transmit (5.1.6.2) -----------------------------------------------------------------

    def _handle_tx(self, queue: Virtqueue, mem: GuestMemory) -> int:
        """Send what the driver made available, a burst at a time.

        The used index is published once per burst (section 2.7.8 lets the device return
        several chains before updating it), so the driver sees up to :data:`_TX_BURST`
        completions at once and can reuse their descriptors while the next burst is sent.
        """
        done = 0
        pop_burst = queue.pop_burst
        add_used_many = queue.add_used_many
        transmit_burst = self._transmit_burst
        pair = self._tx_pair_of(queue)
        while True:
            # The common case first, whole bursts at a time (in C where built): one buffer
            # holding a header that asks for nothing and a frame of a valid size, for one live
            # backend that takes bursts and no steering to remember.
            backend = self.backend
            hdr_len = self.hdr_len
            taken = 0
            if self.pairs == 1 and hasattr(backend, "send_batch"):
                # A backend that keeps frames: copied into one of its buffers in one pass.
                keeper = cast(BatchBackend, backend)
                batch, heads = queue.pop_batch(
                    mem, keeper.buffer(), _TX_FRAMES, skip=hdr_len, min_len=hdr_len + ETH_HLEN,
                    max_len=hdr_len + MAX_FRAME, zero_prefix=2,
                )  # fmt: skip
                self._send_frame_batch(batch, keeper)  # no frames: the buffer goes back
                taken = len(batch)
            elif self.pairs == 1 and hasattr(backend, "send_burst"):
                # Views of guest memory, for a backend done with them when send_burst returns.
                frames, heads = queue.pop_frames(
                    mem, _TX_FRAMES, skip=hdr_len, min_len=hdr_len + ETH_HLEN,
                    max_len=hdr_len + MAX_FRAME, zero_prefix=2,
                )  # fmt: skip
                if frames:
                    self._send_batch(frames, cast(BurstBackend, backend).send_burst)
                taken = len(frames)
            if taken:
                queue.add_used_heads(mem, heads)
                done += taken
                if done >= DRAIN_WEIGHT:
                    return done  # drain() lets the receive side and the rest run
                continue
            # Then whatever stopped that loop (or all of it, without it), chain by chain.
            burst = pop_burst(mem, _TX_BURST)
            if not burst:
                return done
            transmit_burst(burst, mem, pair)
            add_used_many(mem, [(entry[0], 0) for entry in burst])
            done += len(burst)
            if done >= DRAIN_WEIGHT:
                return done

    def _transmit_burst(self, burst: list[Popped], mem: GuestMemory, pair: int) -> None:
        """Send each frame of a burst (5.1.6.2), the common case without a per-frame call.

        The fast path takes a chain that is one device-readable buffer holding header and
        frame (what DPDK and Linux build when the header fits in front of the frame, with
        VIRTIO_F_VERSION_1 or ANY_LAYOUT), a header that asks for no offload, a frame of a
        valid size, a live backend and one queue pair (no steering to remember). Such frames
        go to a backend's ``send_burst`` together (:class:`BurstBackend`), else one by one.
        Everything else, malformed chains included, goes through :meth:`_transmit`, which
        counts and logs it exactly as before; so does a fast-path candidate that fails a
        check. Frames leave in ring order either way.
        """
        hdr_len = self.hdr_len
        low = hdr_len + ETH_HLEN
        high = hdr_len + MAX_FRAME
        backend = self.backend
        fast = backend is not None and self.pairs == 1
        send = backend.send if backend is not None else _unsent
        send_burst: Callable[[Sequence[Chunk]], int] | None = getattr(backend, "send_burst", None)
        batch: list[Chunk] = []
        translate = mem.translate
        transmit = self._transmit
        frames = nbytes = dropped = 0
        for head, addr, length, chain in burst:
            if chain is None:
                if fast and low <= length <= high:
                    try:
                        view = translate(addr, length)
                    except GuestMemoryError:
                        view = None
                    if view is not None and not view[0] and view[1] == GSO_NONE:
                        if send_burst is not None:
                            batch.append(view[hdr_len:])
                            continue
                        try:
                            sent = send((view[hdr_len:],))
                        except BackendClosedError as err:
                            self._backend_failed(err)
                            dropped += 1
                            fast = False
                            continue
                        if sent:
                            frames += 1
                            nbytes += length - hdr_len
                        else:
                            dropped += 1
                        continue
                chain = DescriptorChain(head, [(addr, length)], [])
            if batch:
                self._send_batch(batch, send_burst)  # the frames before this one leave first
                batch = []
            transmit(chain, mem, pair)
            if self.backend is not backend:
                fast = False  # the backend failed: the rest are dropped by _transmit
        if batch:
            self._send_batch(batch, send_burst)
        if frames or dropped:
            stats = self.stats
            stats.tx_frames += frames
            stats.tx_bytes += nbytes
            stats.tx_dropped += dropped

    def _send_batch(
        self, batch: Sequence[Chunk], send_burst: Callable[[Sequence[Chunk]], int] | None
    ) -> None:
        """Hand ``batch`` to the backend's ``send_burst`` and count what it took and dropped."""
        assert send_burst is not None
        stats = self.stats
        try:
            sent = send_burst(batch)
        except BackendClosedError as err:
            self._backend_failed(err)
            sent = 0
        if sent:
            stats.tx_frames += sent
            stats.tx_bytes += sum(map(len, batch if sent == len(batch) else batch[:sent]))
        stats.tx_dropped += len(batch) - sent

    def _send_frame_batch(self, batch: FrameBatch, backend: BatchBackend) -> None:
        """Hand ``batch`` to a backend that keeps frames; count what it took and dropped."""
        stats = self.stats
        try:
            sent = backend.send_batch(batch)
        except BackendClosedError as err:
            self._backend_failed(err)
            sent = 0
        stats.tx_frames += sent
        stats.tx_bytes += batch.offset(sent)
        stats.tx_dropped += len(batch) - sent

    def _tx_pair_of(self, queue: Virtqueue) -> int:
        return self.queues.index(queue) // 2 if self.pairs > 1 else 0

    def _transmit(self, chain: DescriptorChain, mem: GuestMemory, pair: int) -> None:
        stats = self.stats
        if chain.writable:
            stats.tx_errors += 1
            self._warn("tx-writable", f"transmit chain {chain.head} has device-writable buffers")
            return
        readable = chain.readable
        hdr_len = self.hdr_len
        try:
            first_addr, first_len = readable[0] if readable else (0, 0)
            if first_len >= hdr_len:
                header = mem.translate(first_addr, hdr_len)
                parts = [mem.translate(first_addr + hdr_len, first_len - hdr_len)]
                parts += [mem.translate(a, n) for a, n in readable[1:]]
            else:
                head_bytes = gather(readable, hdr_len, mem)
                if head_bytes is None:
                    stats.tx_errors += 1
                    self._warn("tx-short", f"transmit chain {chain.head} is shorter than a header")
                    return
                header = memoryview(head_bytes)
                parts = [mem.translate(a, n) for a, n in skip(readable, hdr_len)]
        except GuestMemoryError as err:
            stats.tx_errors += 1
            self._warn("tx-memory", f"transmit chain {chain.head}: {err}")
            return
        if header[0] or header[1] != GSO_NONE:
            # NEEDS_CSUM or GSO without the features that allow them (5.1.6.2.1).
            stats.tx_errors += 1
            self._warn("tx-offload", f"transmit chain {chain.head} asks for an offload")
            return
        length = sum(len(p) for p in parts)
        if length < ETH_HLEN or length > MAX_FRAME:
            stats.tx_errors += 1
            self._warn("tx-size", f"transmit frame of {length} bytes")
            return
        backend = self.backend
        if backend is None:
            stats.tx_dropped += 1
            return
        if self.pairs > 1:
            self._steer(parts, pair)
        try:
            sent = backend.send(parts)
        except BackendClosedError as err:
            self._backend_failed(err)
            stats.tx_dropped += 1
            return
        if sent:
            stats.tx_frames += 1
            stats.tx_bytes += length
        else:
            stats.tx_dropped += 1

    def _steer(self, parts: list[memoryview], pair: int) -> None:
        """Remember which pair a flow leaves on, for automatic receive steering (5.1.6.5.6)."""
        head = bytes(parts[0][:64]) if len(parts[0]) >= 64 else b"".join(parts)[:64]
        steering = self._steering
        if len(steering) >= _STEERING_ENTRIES:
            steering.clear()
        steering[_flow_key(head)] = pair

    # -- receive (5.1.6.3, 5.1.6.4) ---------------------------------------------------------

    def _pump(self) -> None:
        """Move frames from the backend into receive queues until one side runs dry."""
        if not self._rx_ready:
            self._stop_reading()
            return
        touched: set[int] = set()
        starved = False
        pending = self._pending
        if pending is not None:
            index = self._deliver(memoryview(pending))
            if index == -1:
                return  # still no room: wait for the next kick
            self._pending = None
            if index >= 0:
                touched.add(index)
        backend = self.backend
        ready = self._rx_ready
        if (
            backend is not None
            and self._rx_fast
            and len(ready) == 1
            and self.queues[ready[0]].inflight is None
        ):
            filled = _FILL_GENERAL
            if self.promisc and hasattr(backend, "peek_batch"):
                filled = self._fill_burst(cast(BatchBackend, backend), ready[0], touched)
            starved = filled == _FILL_STARVED
            if filled == _FILL_GENERAL:
                # The frames fill_batch could not place, or (with none left) the backend's
                # "nothing waiting", which disarms its wake-up.
                self._receive_burst(backend, ready[0], touched)
        elif backend is not None:
            scratch = self._scratch_view
            budget = _RX_BUDGET
            deliver = self._deliver
            while budget:
                budget -= 1
                try:
                    n = backend.recv_into(scratch)
                except BackendClosedError as err:
                    self._backend_failed(err)
                    break
                if not n:
                    break
                index = deliver(scratch[:n])
                if index == -1:
                    self._pending = bytes(scratch[:n])
                    break
                if index >= 0:
                    touched.add(index)
        if self._pending is None and not starved:
            self._start_reading()
        else:
            self._stop_reading()  # until the driver's kick brings receive buffers
        for index in touched:
            self.signal(index)

    @property
    def _rx_header(self) -> bytes:
        """The header of a received frame in one buffer (num_buffers 1 where it has one)."""
        return _RX_HEADER if self.hdr_len == HDR_LEN else bytes(self.hdr_len)

    def _fill_burst(self, backend: BatchBackend, index: int, touched: set[int]) -> int:
        """The receive loop's common case, a batch per call and no per-frame Python: frames
        that each fit the one device-writable buffer of the next chain are copied there behind
        their header (num_buffers 1, 5.1.6.4) by :meth:`SplitQueue.fill_batch` (C where
        built). It stops at the first frame that does not fit so; :meth:`_receive_burst` then
        takes that one and the rest, the general way. Only with no filter (promiscuous).

        Returns :data:`_FILL_GENERAL` when the general path is to go on (a frame that does not
        fit one buffer, or the backend ran dry), :data:`_FILL_MORE` after
        :data:`DRAIN_WEIGHT` frames (the loop comes back: the backend is still readable), or
        :data:`_FILL_STARVED` when the ring ran out of chains with frames still waiting: they
        stay in the backend, and the driver is asked for a kick when it adds buffers (2.7.10).
        """
        queue = self.queues[index]
        mem = self.mem
        header = self._rx_header
        stats = self.stats
        done = 0
        while done < DRAIN_WEIGHT:
            waiting = backend.peek_batch()
            if waiting is None:
                return _FILL_GENERAL  # the backend ran dry
            batch, start = waiting
            placed = queue.fill_batch(mem, batch, start, header)
            if placed:
                backend.consume(placed)
                done += placed
                stats.rx_frames += placed
                stats.rx_bytes += batch.offset(start + placed) - batch.offset(start)
                touched.add(index)
                if start + placed == len(batch):
                    continue
            if not queue.has_available(mem):  # out of receive chains
                if not queue.want_more(mem):
                    return _FILL_STARVED
                continue  # buffers came meanwhile
            if not placed:
                return _FILL_GENERAL  # a frame or a chain the general path must take
            # Stopped short with chains there: the driver added them meanwhile; go on.
        return _FILL_MORE

    def _receive_burst(self, backend: NetBackend, index: int, touched: set[int]) -> None:
        """The receive loop of :meth:`_pump` for one receive queue, without per-frame calls.

        Receive chains are taken a burst at a time; a frame that fits the one device-writable
        buffer of the next chain (what Linux posts with MRG_RXBUF and DPDK always) is written
        there with its header (num_buffers 1, 5.1.6.4), and the used entries of a burst are
        published together. Anything else (no chain left, a frame that needs merged buffers,
        a chain of several buffers or a malformed one) first gives the chains not used back,
        publishes the used ones, and goes through :meth:`_deliver` as before, so frames land
        in order and are counted the same. After a chain that is not one writable buffer the
        device stops trying this path until reset: that driver posts other layouts.
        """
        queue = self.queues[index]
        mem = self.mem
        hdr_len = self.hdr_len
        header = self._rx_header
        scratch = self._scratch_view
        recv_into = backend.recv_into
        translate = mem.translate
        pop_burst = queue.pop_burst
        promisc = self.promisc
        accepts = self.accepts
        deliver = self._deliver
        stash: list[Popped] = []
        taken = 0
        used: list[tuple[int, int]] = []
        frames = nbytes = filtered = 0
        try:
            for _ in range(_RX_BUDGET):
                try:
                    n = recv_into(scratch)
                except BackendClosedError as err:
                    self._backend_failed(err)
                    break
                if not n:
                    break
                frame = scratch[:n]
                if not promisc and not accepts(frame):
                    filtered += 1
                    continue
                need = hdr_len + n
                if taken == len(stash) and self._rx_fast:
                    if used:
                        queue.add_used_many(mem, used)
                        used = []
                    stash = pop_burst(mem, _RX_BURST, write=True)
                    taken = 0
                if taken < len(stash):
                    head, addr, length, chain = stash[taken]
                    if chain is None and length >= need:
                        taken += 1
                        try:
                            view = translate(addr, need)
                        except GuestMemoryError as err:
                            self.stats.rx_errors += 1  # as _deliver counts it
                            self._warn("rx-memory", f"receive queue {index}: {err}")
                            continue
                        view[:hdr_len] = header
                        view[hdr_len:] = frame
                        used.append((head, need))
                        frames += 1
                        nbytes += n
                        continue
                    if chain is not None:
                        self._rx_fast = False
                # The general case: chains back, used ones out, then this frame as before.
                queue.unpop(len(stash) - taken)
                stash = []
                taken = 0
                if used:
                    queue.add_used_many(mem, used)
                    used = []
                result = deliver(frame)
                if result == -1:
                    self._pending = bytes(frame)
                    break
                if result >= 0:
                    touched.add(result)
        finally:
            queue.unpop(len(stash) - taken)
            if used:
                queue.add_used_many(mem, used)
            stats = self.stats
            stats.rx_filtered += filtered
            if frames:
                stats.rx_frames += frames
                stats.rx_bytes += nbytes
                touched.add(index)

    def accepts(self, frame: memoryview | bytes) -> bool:
        """The receive filter: RX mode and MAC table (5.1.6.5.1, 5.1.6.5.2)."""
        if self.promisc:
            return True
        dst = bytes(frame[:6])
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or dst in self.multi_table
        if self.nouni:
            return False
        return self.alluni or dst == self.mac or dst in self.uni_table

    def _rx_queue_for(self, frame: memoryview) -> int:
        ready = self._rx_ready
        if len(ready) == 1:
            return ready[0]
        # Our control queue sets the pairs in use; a frontend that handles it itself (QEMU)
        # enables just the rings of the pairs in use.
        candidates = ready
        if self.ctrl_started:
            candidates = [i for i in ready if i // 2 < self.active_pairs] or ready
        key = _flow_key(bytes(frame[:64]))
        pair = self._steering.get(key)
        if pair is not None and 2 * pair in candidates:
            return 2 * pair
        return candidates[hash(key) % len(candidates)]

    def _deliver(self, frame: memoryview) -> int:
        """Put one frame in a receive queue: its index; -1 if no room; -2 if dropped."""
        if not self.accepts(frame):
            self.stats.rx_filtered += 1
            return -2
        index = self._rx_queue_for(frame)
        queue = self.queues[index]
        mem = self.mem
        try:
            while True:
                result = self._place(queue, mem, frame)
                if result != -1:
                    break
                if not queue.want_more(mem):
                    return -1
        except GuestMemoryError as err:
            self.stats.rx_errors += 1
            self._warn("rx-memory", f"receive queue {index}: {err}")
            return -2
        return index if result >= 0 else -2

    def _place(self, queue: Virtqueue, mem: GuestMemory, frame: memoryview) -> int:
        """Write ``frame`` into chains of ``queue``: 0 done, -1 no room yet, -2 dropped."""
        hdr_len = self.hdr_len
        need = hdr_len + len(frame)
        pop = queue.pop
        while True:
            chain = pop(mem)
            if chain is None:
                return -1
            if not chain.readable and chain.writable:
                break
            self._bad_rx_chains(queue, mem, [chain])
        addr, length = chain.writable[0]
        if length >= need:
            # The common case: header and frame fit the chain's first buffer.
            view = mem.translate(addr, need)
            if hdr_len == HDR_LEN:
                NET_HDR.pack_into(view, 0, 0, GSO_NONE, 0, 0, 0, 0, 1)
            else:
                view[:hdr_len] = bytes(hdr_len)
            view[hdr_len:] = frame
            queue.add_used(mem, chain.head, need)
            stats = self.stats
            stats.rx_frames += 1
            stats.rx_bytes += len(frame)
            return 0
        chains = [chain]
        room = chain.writable_len
        while room < need and self.mrg_rxbuf:
            more = pop(mem)
            if more is None:
                queue.unpop(len(chains))
                return -1
            chains.append(more)
            if more.readable or not more.writable:
                self._bad_rx_chains(queue, mem, chains)
                self.stats.rx_dropped += 1
                return -2
            room += more.writable_len
        if room < need:
            # Without MRG_RXBUF the driver promised big enough buffers (5.1.6.3.1).
            queue.unpop(len(chains))
            self.stats.rx_dropped += 1
            self._warn("rx-small", f"receive buffers of {room} bytes for a frame of {need}")
            return -2
        data = bytearray(need)
        if hdr_len == HDR_LEN:
            NET_HDR.pack_into(data, 0, 0, GSO_NONE, 0, 0, 0, 0, len(chains))
        data[hdr_len:] = frame
        offset = 0
        used: list[tuple[int, int]] = []
        for c in chains:
            start = offset
            for baddr, blen in c.writable:
                take = min(blen, need - offset)
                if take:
                    mem.translate(baddr, take)[:] = data[offset : offset + take]
                    offset += take
            used.append((c.head, offset - start))
        # All buffers of the frame become visible together (5.1.6.4).
        queue.add_used_many(mem, used)
        self.stats.rx_frames += 1
        self.stats.rx_bytes += len(frame)
        return 0

    def _bad_rx_chains(
        self, queue: Virtqueue, mem: GuestMemory, chains: list[DescriptorChain]
    ) -> None:
        """Complete receive chains with nothing written; one of them has readable buffers."""
        self.stats.rx_errors += 1
        self._warn("rx-readable", f"receive chain {chains[-1].head} has device-readable buffers")
        queue.add_used_many(mem, [(c.head, 0) for c in chains])

    # -- control queue (5.1.6.5) ------------------------------------------------------------

    def _handle_ctrl(self, queue: Virtqueue, mem: GuestMemory) -> int:
        done = 0
        while (chain := queue.pop(mem)) is not None:
            writable = chain.writable
            if not writable or writable[-1][1] == 0:
                raise QueueError(f"control request {chain.head} has no writable ack byte")
            addr, length = writable[-1]
            try:
                ack_view = mem.translate(addr + length - 1, 1)
            except GuestMemoryError as err:
                raise QueueError(f"control request {chain.head}: ack byte: {err}") from err
            try:
                request = gather(chain.readable, chain.readable_len, mem) or b""
            except GuestMemoryError:
                request = b""
            ack = self.control(request)
            if ack != CTRL_OK:
                self.stats.ctrl_errors += 1
            ack_view[0] = ack
            queue.add_used(mem, chain.head, 1)
            done += 1
        return done

    def control(self, request: bytes) -> int:
        """Carry out one control command (class, command, data); the ack (5.1.6.5)."""
        if len(request) < 2:
            return CTRL_ERR
        klass, command, data = request[0], request[1], request[2:]
        if klass == CTRL_RX and self._acked(F_CTRL_RX):
            return self._ctrl_rx(command, data)
        if klass == CTRL_MAC and self._acked(F_CTRL_RX):
            if command == CTRL_MAC_TABLE_SET:
                return self._ctrl_mac_table(data)
            if command == CTRL_MAC_ADDR_SET and self._acked(F_CTRL_MAC_ADDR):
                if len(data) != 6 or data[0] & 1:
                    return CTRL_ERR
                self.mac = bytes(data)
                log.info("MAC address set to %s", format_mac(self.mac))
                return CTRL_OK
            return CTRL_ERR
        if klass == CTRL_MQ and self._acked(F_MQ) and command == CTRL_MQ_VQ_PAIRS_SET:
            if len(data) != 2:
                return CTRL_ERR
            (pairs,) = _U16.unpack(data)
            if not 1 <= pairs <= self.pairs:
                return CTRL_ERR
            self.active_pairs = pairs
            return CTRL_OK
        return CTRL_ERR

    def _ctrl_rx(self, command: int, data: bytes) -> int:
        if len(data) != 1:
            return CTRL_ERR
        on = bool(data[0])
        names = {
            CTRL_RX_PROMISC: "promisc",
            CTRL_RX_ALLMULTI: "allmulti",
            CTRL_RX_ALLUNI: "alluni",
            CTRL_RX_NOMULTI: "nomulti",
            CTRL_RX_NOUNI: "nouni",
            CTRL_RX_NOBCAST: "nobcast",
        }
        name = names.get(command)
        if name is None or (command > CTRL_RX_ALLMULTI and not self._acked(F_CTRL_RX_EXTRA)):
            return CTRL_ERR
        setattr(self, name, on)
        return CTRL_OK

    def _ctrl_mac_table(self, data: bytes) -> int:
        tables: list[frozenset[bytes]] = []
        offset = 0
        for _ in range(2):
            if len(data) < offset + 4:
                return CTRL_ERR
            (entries,) = _U32.unpack_from(data, offset)
            offset += 4
            if entries > MAX_QUEUE_PAIRS or len(data) < offset + 6 * entries:
                return CTRL_ERR
            macs = [bytes(data[offset + 6 * i : offset + 6 * i + 6]) for i in range(entries)]
            offset += 6 * entries
            tables.append(frozenset(macs))
        if offset != len(data):
            return CTRL_ERR
        uni, multi = tables
        if any(m[0] & 1 for m in uni) or any(not m[0] & 1 for m in multi):
            return CTRL_ERR
        # Like QEMU: a table too long to keep turns into "accept all" of that kind.
        self.uni_table = uni if len(uni) <= MAC_TABLE_ENTRIES else frozenset()
        self.multi_table = multi if len(multi) <= MAC_TABLE_ENTRIES else frozenset()
        self.alluni = self.alluni or len(uni) > MAC_TABLE_ENTRIES
        self.allmulti = self.allmulti or len(multi) > MAC_TABLE_ENTRIES
        return CTRL_OK


def _unsent(parts: Sequence[memoryview]) -> bool:
    """Stands in for the send of a missing backend (the fast path is off then)."""
    return False


def _flow_key(frame: bytes) -> bytes:
    """The same key for both directions of an IP flow (addresses and ports), else of MACs."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34:
        ihl = (frame[14] & 15) * 4
        a, b = frame[26:30], frame[30:34]
        if frame[23] in (6, 17) and len(frame) >= 18 + ihl:
            a += frame[14 + ihl : 16 + ihl]
            b += frame[16 + ihl : 18 + ihl]
    elif ethertype == b"\x86\xdd" and len(frame) >= 54:
        a, b = frame[22:38], frame[38:54]
        if frame[20] in (6, 17) and len(frame) >= 58:
            a += frame[54:56]
            b += frame[56:58]
    else:
        a, b = frame[0:6], frame[6:12]
    return a + b if a <= b else b + a
