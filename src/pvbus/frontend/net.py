"""A virtio-net driver in userspace (VIRTIO 1.2 section 5.1) over any vhost-user-net backend.

:class:`NetClient` sends and receives Ethernet frames through a backend with no VM, like DPDK's
virtio-user: every frame goes out as one chain (header and frame in one device-readable buffer
from a per-queue slot array) and comes in through receive buffers posted in advance, merged
by ``num_buffers`` when VIRTIO_NET_F_MRG_RXBUF is negotiated. When the device offers a control
queue, :meth:`NetClient.control` and its helpers set the RX mode, MAC filter table, MAC address
and the number of queue pairs in use.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pvbus.frontend._connection import (
    DeviceClient,
    FrontendError,
    FrontendQueue,
    VhostUserFrontend,
)
from pvbus.frontend._memory import GuestBuffer, MemfdMemory
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
from pvbus.virtio.constants import F_EVENT_IDX, F_VERSION_1, bit

__all__ = ["DRIVER_FEATURES", "NetClient", "NetClientError", "NetInfo", "NetQueuePair"]

# Feature bits (section 5.1.3).
F_MAC = 5
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_RX_EXTRA = 20
F_MQ = 22
F_CTRL_MAC_ADDR = 23

#: The device features this driver understands (no offloads).
DRIVER_FEATURES = (
    bit(F_VERSION_1)
    | bit(F_EVENT_IDX)
    | bit(F_MAC)
    | bit(F_MRG_RXBUF)
    | bit(F_STATUS)
    | bit(F_CTRL_VQ)
    | bit(F_CTRL_RX)
    | bit(F_CTRL_RX_EXTRA)
    | bit(F_MQ)
    | bit(F_CTRL_MAC_ADDR)
)

_HDR = struct.Struct("<BBHHHHH")
_CONFIG = struct.Struct("<6sHH")
_CTRL_AREA = 2048
_CTRL_ACK = _CTRL_AREA - 1
CTRL_OK = 0


class NetClientError(FrontendError):
    """The device refused or broke a frame or control command."""


@dataclass(frozen=True, slots=True)
class NetInfo:
    """What the config space says (5.1.4); ``None`` where the feature is missing."""

    mac: bytes | None
    link_up: bool
    max_queue_pairs: int

    @classmethod
    def parse(cls, config: bytes | None, features: int) -> NetInfo:
        if config is None or len(config) < _CONFIG.size:
            return cls(None, True, 1)
        mac, status, pairs = _CONFIG.unpack_from(config)
        return cls(
            mac if features & bit(F_MAC) else None,
            bool(status & 1) if features & bit(F_STATUS) else True,
            pairs if features & bit(F_MQ) and pairs else 1,
        )


class NetQueuePair:
    """One receive and one transmit queue with their buffers in guest memory."""

    def __init__(
        self,
        client: NetClient,
        rx: FrontendQueue,
        tx: FrontendQueue,
        rx_buffer_size: int,
        tx_buffer_size: int,
    ) -> None:
        self.client = client
        self.rx = rx
        self.tx = tx
        memory = client.memory
        size = rx.ring.size
        self.rx_buffer_size = rx_buffer_size
        self.tx_buffer_size = tx_buffer_size
        self._rx_area = memory.alloc(size * rx_buffer_size, 4096)
        self._tx_area = memory.alloc(size * tx_buffer_size, 4096)
        self._rx_of_head: dict[int, int] = {}
        self._rx_used: deque[tuple[int, int]] = deque()
        self._tx_free = list(range(size - 1, -1, -1))
        self._tx_of_head: dict[int, int] = {}
        self.sent = 0
        self.received = 0
        self.rx_errors = 0
        for i in range(size):
            self._post_rx(i)
        rx.publish()

    def _post_rx(self, slot: int) -> None:
        gpa = self._rx_area.gpa + slot * self.rx_buffer_size
        head = self.rx.ring.add([], [(gpa, self.rx_buffer_size)])
        self._rx_of_head[head] = slot

    # -- transmit ---------------------------------------------------------------------------

    def reap_tx(self) -> int:
        """Take back transmit slots the device is done with; how many."""
        ring = self.tx.ring
        done = 0
        while used := ring.get_used():
            for head, _ in used:
                self._tx_free.append(self._tx_of_head.pop(head))
            done += len(used)
            ring.set_interrupts(True)
        return done

    def send_batch(self, frames: Iterable[bytes | memoryview], timeout: float | None = 5.0) -> int:
        """Queue ``frames`` and notify the device once; waits for room when the ring is full."""
        hdr_len = self.client.hdr_len
        ring = self.tx.ring
        view = self._tx_area.view
        base = self._tx_area.gpa
        size = self.tx_buffer_size
        count = 0
        for frame in frames:
            if len(frame) + hdr_len > size:
                raise ValueError(f"frame of {len(frame)} bytes; transmit buffers hold {size}")
            if not self._tx_free:
                self.tx.publish()
                self._wait_tx(timeout)
            slot = self._tx_free.pop()
            off = slot * size
            view[off : off + hdr_len] = bytes(hdr_len)
            view[off + hdr_len : off + hdr_len + len(frame)] = frame
            head = ring.add([(base + off, hdr_len + len(frame))])
            self._tx_of_head[head] = slot
            count += 1
        self.tx.publish()
        self.sent += count
        return count

    def _wait_tx(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.reap_tx():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise NetClientError(f"transmit queue {self.tx.index} stayed full")
            self.client.frontend.wait([self.tx], left)
            self.tx.ack_calls()

    # -- receive ----------------------------------------------------------------------------

    def recv_batch(self) -> list[bytes]:
        """Every frame received so far (without waiting); receive buffers are reposted."""
        ring = self.rx.ring
        pending = self._rx_used
        of_head = self._rx_of_head
        while used := ring.get_used():
            # get_used frees the descriptors: map heads to buffers before any is reused.
            pending.extend((of_head.pop(head), length) for head, length in used)
            ring.set_interrupts(True)
        client = self.client
        hdr_len = client.hdr_len
        view = self._rx_area.view
        size = self.rx_buffer_size
        out: list[bytes] = []
        reposted = False
        while pending:
            slot, length = pending[0]
            off = slot * size
            if length < hdr_len or length > size:
                self.rx_errors += 1
                count = 1
            else:
                count = _HDR.unpack_from(view, off)[6] if client.mrg_rxbuf else 1
                if count < 1:
                    self.rx_errors += 1
                    count = 1
                elif len(pending) < count:
                    break  # the rest of the frame is not visible yet
            parts: list[bytes] = []
            for i in range(count):
                s, n = pending.popleft()
                start = s * size + (hdr_len if i == 0 else 0)
                parts.append(bytes(view[start : s * size + min(n, size)]))
                self._post_rx(s)
            reposted = True
            if length >= hdr_len and length <= size:
                out.append(b"".join(parts))
        if reposted:
            self.rx.publish()
        self.received += len(out)
        return out

    def recv(self, timeout: float | None = 5.0) -> list[bytes]:
        """Frames received, waiting up to ``timeout`` for at least one (empty on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (frames := self.recv_batch()):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            if self.client.frontend.wait([self.rx], left):
                self.rx.ack_calls()
        return frames


class NetClient(DeviceClient):
    """A userspace virtio-net driver on one vhost-user-net backend socket."""

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        queue_pairs: int = 1,
        queue_size: int = 256,
        rx_buffer_size: int = 2048,
        tx_buffer_size: int = 2048,
        driver_features: int = DRIVER_FEATURES,
    ) -> None:
        if queue_size < 4 or queue_size & (queue_size - 1):
            raise ValueError(f"queue size {queue_size} is not a power of two >= 4")
        self.frontend = frontend
        self.features = frontend.negotiate(driver_features)
        if not self.features & bit(F_VERSION_1):
            raise FrontendError("the backend does not offer VIRTIO_F_VERSION_1")
        self.mrg_rxbuf = bool(self.features & bit(F_MRG_RXBUF))
        self.hdr_len = _HDR.size
        if rx_buffer_size < self.hdr_len + (14 if self.mrg_rxbuf else 1514):
            raise ValueError(f"receive buffers of {rx_buffer_size} bytes are too small")
        self.info = NetInfo.parse(frontend.get_config(_CONFIG.size), self.features)
        if queue_pairs > 1:
            if not self.features & bit(F_MQ):
                raise FrontendError("several queue pairs need VIRTIO_NET_F_MQ")
            if queue_pairs > self.info.max_queue_pairs:
                raise FrontendError(
                    f"{queue_pairs} queue pairs asked, the device has {self.info.max_queue_pairs}"
                )
        per_pair = queue_size * (rx_buffer_size + tx_buffer_size) + 3 * 32 * queue_size
        self.memory = MemfdMemory(queue_pairs * per_pair + (1 << 20))
        frontend.set_memory(self.memory)
        self.pairs = [
            NetQueuePair(
                self,
                frontend.start_queue(2 * i, queue_size),
                frontend.start_queue(2 * i + 1, queue_size),
                rx_buffer_size,
                tx_buffer_size,
            )
            for i in range(queue_pairs)
        ]
        self.ctrl: FrontendQueue | None = None
        self._ctrl_area: GuestBuffer | None = None
        if self.features & bit(F_CTRL_VQ):
            self._ctrl_area = self.memory.alloc(_CTRL_AREA, 64)
            ctrl_index = 2 * max(self.info.max_queue_pairs, queue_pairs)
            self.ctrl = frontend.start_queue(ctrl_index, 16)
        frontend.sync()
        if queue_pairs > 1:
            self.set_queue_pairs(queue_pairs)

    @classmethod
    def connect(
        cls,
        path: str,
        *,
        queue_pairs: int = 1,
        queue_size: int = 256,
        rx_buffer_size: int = 2048,
        tx_buffer_size: int = 2048,
        driver_features: int = DRIVER_FEATURES,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
        timeout: float | None = 10.0,
    ) -> NetClient:
        """Connect to the backend listening at ``path`` and start ``queue_pairs`` pairs."""
        return cls._open(
            path,
            connect_timeout=timeout,
            protocol_features=protocol_features,
            packed=packed,
            queue_pairs=queue_pairs,
            queue_size=queue_size,
            rx_buffer_size=rx_buffer_size,
            tx_buffer_size=tx_buffer_size,
            driver_features=driver_features,
        )

    @property
    def mac(self) -> bytes | None:
        return self.info.mac

    # -- frames -----------------------------------------------------------------------------

    def send(self, frame: bytes | memoryview, pair: int = 0) -> None:
        """Transmit one Ethernet frame on queue pair ``pair``."""
        self.pairs[pair].send_batch([frame])

    def send_batch(self, frames: Iterable[bytes | memoryview], pair: int = 0) -> int:
        """Transmit frames with one notification; returns how many."""
        return self.pairs[pair].send_batch(frames)

    def recv(self, pair: int = 0, timeout: float | None = 5.0) -> list[bytes]:
        """Frames received on ``pair``, waiting up to ``timeout`` for the first."""
        return self.pairs[pair].recv(timeout)

    # -- control queue (5.1.6.5) ------------------------------------------------------------

    def control(self, klass: int, command: int, data: bytes = b"", timeout: float = 5.0) -> int:
        """Send one control command; return the device's ack (0 is VIRTIO_NET_OK)."""
        ctrl, area = self.ctrl, self._ctrl_area
        if ctrl is None or area is None:
            raise NetClientError("the device has no control queue")
        if len(data) + 2 > _CTRL_ACK:
            raise ValueError("control command too long")
        area.view[0:2] = bytes((klass, command))
        area.view[2 : 2 + len(data)] = data
        area.view[_CTRL_ACK] = 0xFF
        readable = [(area.gpa, 2)] + ([(area.gpa + 2, len(data))] if data else [])
        ctrl.ring.add(readable, [(area.gpa + _CTRL_ACK, 1)])
        ctrl.publish()
        deadline = time.monotonic() + timeout
        while not ctrl.ring.get_used():
            left = deadline - time.monotonic()
            if left <= 0 or not self.frontend.wait([ctrl], left):
                raise NetClientError(f"no answer to control command {klass}/{command}")
            ctrl.ack_calls()
        ctrl.ring.set_interrupts(True)
        return area.view[_CTRL_ACK]

    def _check(self, ack: int, what: str) -> None:
        if ack != CTRL_OK:
            raise NetClientError(f"device refused {what} (ack {ack})")

    def set_rx_mode(self, mode: int, on: bool) -> None:
        """VIRTIO_NET_CTRL_RX: 0 promisc, 1 allmulti, 2 alluni, 3 nomulti, 4 nouni, 5 nobcast."""
        self._check(self.control(0, mode, bytes([on])), f"RX mode {mode}")

    def set_mac_table(self, unicast: Iterable[bytes], multicast: Iterable[bytes]) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET."""
        uni, multi = list(unicast), list(multicast)
        data = struct.pack("<I", len(uni)) + b"".join(uni)
        data += struct.pack("<I", len(multi)) + b"".join(multi)
        self._check(self.control(1, 0, data), "MAC table")

    def set_mac(self, mac: bytes) -> None:
        """VIRTIO_NET_CTRL_MAC_ADDR_SET."""
        self._check(self.control(1, 1, mac), "MAC address")

    def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET."""
        self._check(self.control(4, 0, struct.pack("<H", pairs)), f"{pairs} queue pairs")
