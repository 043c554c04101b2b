"""A virtio-vsock driver in userspace (VIRTIO 1.2 section 5.10) over a vhost-user backend.

:class:`VsockClient` plays the guest's transport: it connects to host ports, accepts
connections the host makes to ports it listens on, and moves stream data with the credit
rules of section 5.10.6.3 (a small ``buf_alloc`` makes them visible: the host must wait for
CREDIT_UPDATE). :meth:`VsockClient.send_packet` sends any packet, malformed ones included, so a
backend's error handling is testable with no VM.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from pvbus.frontend._connection import (
    DeviceClient,
    FrontendError,
    FrontendQueue,
    VhostUserFrontend,
)
from pvbus.frontend._memory import MemfdMemory
from pvbus.vhost_user.frontend import FRONTEND_PROTOCOL_FEATURES
from pvbus.virtio.constants import F_EVENT_IDX, F_VERSION_1, bit

__all__ = ["HEADER", "GuestStream", "VsockClient", "VsockClientError"]

HEADER = struct.Struct("<QQIIIHHIII")
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN = 1, 2, 3, 4
OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 5, 6, 7
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2

DRIVER_FEATURES = bit(F_VERSION_1) | bit(F_EVENT_IDX)
_RX_BUF = 4096 + HEADER.size


class VsockClientError(FrontendError):
    """A connection was refused or reset, or the device did not answer in time."""


@dataclass(eq=False)
class GuestStream:
    """One connection as the guest sees it (``port`` is the guest's, ``peer_port`` the host's)."""

    port: int
    peer_port: int
    buf_alloc: int
    state: str = "connecting"  # connecting, connected, closed
    received: bytearray = field(default_factory=bytearray)
    fwd_cnt: int = 0
    fwd_reported: int = 0
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0
    reset: bool = False

    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class VsockClient(DeviceClient):
    """A userspace virtio-vsock driver on one vhost-user backend socket."""

    wait_error = VsockClientError

    def __init__(
        self,
        frontend: VhostUserFrontend,
        *,
        queue_size: int = 64,
        buf_alloc: int = 64 * 1024,
        timeout: float = 5.0,
    ) -> None:
        self.frontend = frontend
        self.timeout = timeout
        self.buf_alloc = buf_alloc
        self.features = frontend.negotiate(DRIVER_FEATURES)
        config = frontend.get_config(8)
        if config is None:
            raise FrontendError("the backend has no config space (VHOST_USER_PROTOCOL_F_CONFIG)")
        self.cid: int = struct.unpack("<Q", config)[0]
        self.memory = MemfdMemory(3 * queue_size * (_RX_BUF + 64) + (1 << 20))
        frontend.set_memory(self.memory)
        self.rx = frontend.start_queue(0, queue_size)
        self.tx = frontend.start_queue(1, queue_size)
        self.event = frontend.start_queue(2, 8)
        self._rx_area = self.memory.alloc(queue_size * _RX_BUF, 4096)
        self._rx_slot: dict[int, int] = {}
        for slot in range(queue_size):
            self._post_rx(slot)
        self.rx.publish()
        self._tx_bufs: dict[int, int] = {}
        self.streams: dict[tuple[int, int], GuestStream] = {}
        self.listening: set[int] = set()
        #: Every packet header the device sent, as tuples (for tests).
        self.packets: list[tuple[int, ...]] = []
        self._next_port = 50000
        frontend.sync()

    @classmethod
    def connect_backend(
        cls,
        path: str,
        *,
        queue_size: int = 64,
        buf_alloc: int = 64 * 1024,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        packed: bool = False,
        timeout: float = 5.0,
    ) -> VsockClient:
        """Connect to the vhost-user backend listening at ``path`` and start the device."""
        return cls._open(
            path,
            connect_timeout=timeout,
            protocol_features=protocol_features,
            packed=packed,
            queue_size=queue_size,
            buf_alloc=buf_alloc,
            timeout=timeout,
        )

    # -- rings ------------------------------------------------------------------------------

    def _post_rx(self, slot: int) -> None:
        gpa = self._rx_area.gpa + slot * _RX_BUF
        self._rx_slot[self.rx.ring.add([], [(gpa, _RX_BUF)])] = slot

    def send_packet(self, data: bytes, writable: int = 0) -> None:
        """Put ``data`` on the transmit queue as one chain (plus ``writable`` bytes, wrongly)."""
        self._reap_tx()
        deadline = time.monotonic() + self.timeout
        while self.tx.ring.num_free < 2:
            # Wait on the transmit queue only: polling the receive queue here would re-enter
            # packet handling.
            left = deadline - time.monotonic()
            if left <= 0:
                raise VsockClientError("the device does not consume the transmit queue")
            if self.frontend.wait([self.tx], min(left, 0.1)):
                self.tx.ack_calls()
            self._reap_tx()
        buf = self.memory.alloc(max(len(data), 1))
        buf.view[: len(data)] = data
        wr = []
        if writable:
            wbuf = self.memory.alloc(writable)
            wr = [(wbuf.gpa, writable)]
        head = self.tx.ring.add([(buf.gpa, len(data))], wr)
        self._tx_bufs[head] = buf.gpa
        if wr:
            self._tx_bufs[head | 1 << 20] = wr[0][0]
        self.tx.publish()

    def _reap_tx(self) -> None:
        for head, _ in self.tx.ring.get_used():
            self.memory.free(self._tx_bufs.pop(head))
            extra = self._tx_bufs.pop(head | 1 << 20, None)
            if extra is not None:
                self.memory.free(extra)
        self.tx.ring.set_interrupts(True)

    def _packet(self, stream: GuestStream, op: int, payload: bytes = b"", flags: int = 0) -> None:
        stream.fwd_reported = stream.fwd_cnt
        header = HEADER.pack(
            self.cid,
            HOST_CID,
            stream.port,
            stream.peer_port,
            len(payload),
            TYPE_STREAM,
            op,
            flags,
            stream.buf_alloc,
            stream.fwd_cnt,
        )
        self.send_packet(header + payload)

    def poll(self) -> None:
        """Handle the packets the device put on the receive queue."""
        ring = self.rx.ring
        view = self._rx_area.view
        reposted = False
        while used := ring.get_used():
            # get_used frees every returned chain's descriptors: map heads to slots before
            # reposting reuses them.
            slots = [(self._rx_slot.pop(head), length) for head, length in used]
            packets = []
            for slot, length in slots:
                off = slot * _RX_BUF
                packets.append(bytes(view[off : off + min(length, _RX_BUF)]))
                self._post_rx(slot)
                reposted = True
            for packet in packets:
                self._on_packet(packet)
            ring.set_interrupts(True)
        if reposted:
            self.rx.publish()
        self._reap_tx()

    def _on_packet(self, packet: bytes) -> None:
        if len(packet) < HEADER.size:
            raise VsockClientError(f"device sent a {len(packet)}-byte packet")
        fields = HEADER.unpack_from(packet)
        self.packets.append(fields)
        src_cid, dst_cid, src_port, dst_port, length, _, op, flags, buf_alloc, fwd_cnt = fields
        if src_cid != HOST_CID or dst_cid != self.cid:
            raise VsockClientError(f"packet from CID {src_cid} to {dst_cid}")
        key = (dst_port, src_port)
        stream = self.streams.get(key)
        if op == OP_REQUEST and stream is None:
            if dst_port not in self.listening:
                self._packet(GuestStream(dst_port, src_port, self.buf_alloc), OP_RST)
                return
            stream = GuestStream(dst_port, src_port, self.buf_alloc, state="connected")
            stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
            self.streams[key] = stream
            self._packet(stream, OP_RESPONSE)
            return
        if stream is None:
            return  # an RST for something we forgot, or noise
        if op == OP_RST:
            stream.state = "closed"
            stream.reset = True
            return
        stream.peer_buf_alloc, stream.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RESPONSE and stream.state == "connecting":
            stream.state = "connected"
        elif op == OP_RW:
            stream.received += packet[HEADER.size : HEADER.size + length]
        elif op == OP_SHUTDOWN:
            stream.peer_shutdown |= flags
        elif op == OP_CREDIT_REQUEST:
            self._packet(stream, OP_CREDIT_UPDATE)

    def _polled_queues(self) -> list[FrontendQueue]:
        return [self.rx, self.tx]

    # -- sockets ----------------------------------------------------------------------------

    def connect(self, port: int, timeout: float | None = None) -> GuestStream:
        """Connect to host port ``port`` (CID 2); raises if the host refuses."""
        self._next_port += 1
        stream = GuestStream(self._next_port, port, self.buf_alloc)
        self.streams[(stream.port, port)] = stream
        self._packet(stream, OP_REQUEST)
        self.wait_for(lambda: stream.state != "connecting", f"host port {port}", timeout)
        if stream.state != "connected":
            del self.streams[(stream.port, port)]
            raise VsockClientError(f"host port {port} refused the connection")
        return stream

    def listen(self, port: int) -> None:
        """Accept host connections to ``port`` from now on."""
        self.listening.add(port)

    def accept(self, port: int, timeout: float | None = None) -> GuestStream:
        """Wait for a host connection to ``port``."""
        seen = set(self.streams)
        found: list[GuestStream] = []

        def arrived() -> bool:
            found.extend(s for k, s in self.streams.items() if k not in seen and k[0] == port)
            return bool(found)

        self.wait_for(arrived, f"a connection to port {port}", timeout)
        return found[0]

    def send(self, stream: GuestStream, data: bytes, timeout: float | None = None) -> None:
        """Send ``data``, waiting for the host's credit as needed."""
        view = memoryview(data)
        while view:
            if stream.state != "connected":
                raise VsockClientError("connection reset")
            if stream.credit() <= 0:
                self._packet(stream, OP_CREDIT_REQUEST)
                self.wait_for(
                    lambda: stream.credit() > 0 or stream.state != "connected", "credit", timeout
                )
                continue
            n = min(stream.credit(), 4096, len(view))
            self._packet(stream, OP_RW, bytes(view[:n]))
            stream.tx_cnt = (stream.tx_cnt + n) & 0xFFFFFFFF
            view = view[n:]

    def recv(self, stream: GuestStream, size: int, timeout: float | None = None) -> bytes:
        """Exactly ``size`` bytes (fewer only at EOF), granting credit as they are consumed."""
        out = bytearray()

        def take() -> bool:
            n = min(size - len(out), len(stream.received))
            if n:
                out.extend(stream.received[:n])
                del stream.received[:n]
                stream.fwd_cnt = (stream.fwd_cnt + n) & 0xFFFFFFFF
                unreported = (stream.fwd_cnt - stream.fwd_reported) & 0xFFFFFFFF
                if stream.state == "connected" and unreported >= stream.buf_alloc // 2:
                    self._packet(stream, OP_CREDIT_UPDATE)
            return (
                len(out) >= size
                or stream.state != "connected"
                or bool(stream.peer_shutdown & SHUTDOWN_SEND and not stream.received)
            )

        self.wait_for(take, f"{size} bytes", timeout)
        return bytes(out)

    def recv_until_eof(self, stream: GuestStream, timeout: float | None = None) -> bytes:
        """Everything until the host shuts down its side (or resets)."""
        out = bytearray()
        while True:
            chunk = self.recv(stream, 1 << 16 if stream.received else 1, timeout)
            out += chunk
            if not chunk or (
                not stream.received
                and (stream.state != "connected" or stream.peer_shutdown & SHUTDOWN_SEND)
            ):
                self.poll()
                out += stream.received
                stream.received.clear()
                return bytes(out)

    def shutdown(self, stream: GuestStream, flags: int = SHUTDOWN_SEND) -> None:
        """Send SHUTDOWN with ``flags``."""
        self._packet(stream, OP_SHUTDOWN, flags=flags)

    def close_stream(self, stream: GuestStream, timeout: float | None = None) -> None:
        """Close like Linux: SHUTDOWN both ways, then wait for the host's RST."""
        if stream.state == "connected":
            self.shutdown(stream, SHUTDOWN_RCV | SHUTDOWN_SEND)
            self.wait_for(lambda: stream.state == "closed", "RST after shutdown", timeout)
        self.streams.pop((stream.port, stream.peer_port), None)
