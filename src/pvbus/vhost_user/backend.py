"""The backend side of vhost-user as a state machine (vhost-user.rst, backend behaviour).

:class:`BackendSession` is fed decoded :class:`Message` s and returns the reply to send, if
any. It owns what the frontend hands over (the memory table, the vring fds) and the device's
queues' configuration; it never reads or writes a socket. The transport learns which eventfds
to watch from :class:`RingListener` callbacks and routes kicks to the device.

Ring life cycle ("Starting and stopping rings"): a ring starts when it gets a kick fd (or the
"no fd" bit) and stops on GET_VRING_BASE. It is enabled at start unless
VHOST_USER_F_PROTOCOL_FEATURES was negotiated, in which case SET_VRING_ENABLE decides. The
device processes a ring only while it is started and enabled.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from pvbus.devices.base import VirtioDevice
from pvbus.vhost_user.errors import RemoteProtocolError
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    U64,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    ConfigSpace,
    Flags,
    Inflight,
    MemTable,
    Message,
    ProtocolFeature,
    SingleRegion,
    VringAddr,
    VringState,
)
from pvbus.virtio.constants import F_RING_PACKED, MAX_QUEUE_SIZE, DeviceStatus
from pvbus.virtio.errors import VirtioError
from pvbus.virtio.inflight import (
    PackedInflight,
    SplitInflight,
    packed_region_size,
    queue_region_size,
)
from pvbus.virtio.memory import MAX_REGIONS, GuestMemory, MemoryRegion
from pvbus.virtio.packed import PackedQueue
from pvbus.virtio.split import SplitQueue

log = logging.getLogger(__name__)

#: Protocol features every pvbus backend supports.
BACKEND_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.RESET_DEVICE
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.STATUS
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one frontend may make a backend hold (documented in docs/reliability.md).

    ``max_mem_slots`` regions (GET_MAX_MEM_SLOTS) of at most ``max_memory`` bytes in all.
    Queue sizes are bounded by the device's ``max_queue_size``, fds by what each message may
    carry (replaced fds are closed), the inflight area by the queue count and size.
    """

    max_mem_slots: int = MAX_REGIONS
    max_memory: int = 1 << 40

    def __post_init__(self) -> None:
        if not 1 <= self.max_mem_slots <= MAX_REGIONS:
            raise ValueError(f"max memory slots {self.max_mem_slots} not in 1..{MAX_REGIONS}")
        if self.max_memory < 1 << 20:
            raise ValueError(f"max memory {self.max_memory} is less than 1 MiB")


class RingListener(Protocol):
    """What the transport does when rings start and stop."""

    def ring_started(self, index: int, kick_fd: int | None) -> None:
        """Watch ``kick_fd`` (``None``: poll the ring) and route kicks to the device."""

    def ring_stopped(self, index: int) -> None:
        """Stop watching ring ``index``; the device must not touch it any more."""


@dataclass(slots=True)
class Ring:
    """vhost-user state of one vring, beside the device's queue (split or packed)."""

    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    polled: bool = False


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class BackendSession:
    """One frontend connection's protocol state, driving one device."""

    def __init__(
        self,
        device: VirtioDevice,
        listener: RingListener,
        *,
        max_mem_slots: int = MAX_REGIONS,
        max_memory: int = 1 << 40,
        protocol_features: int = BACKEND_PROTOCOL_FEATURES,
    ) -> None:
        self.device = device
        self.listener = listener
        self.max_mem_slots = max_mem_slots
        self.max_memory = max_memory
        self.offered_protocol_features = protocol_features
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.needs_reset = False
        self.owner = False
        self.rings = [Ring() for _ in range(device.num_queues)]
        self.inflight: MemoryRegion | None = None
        self.inflight_queue_size = 0
        #: The inflight area's per-queue format: QueueRegionPacked or QueueRegionSplit, as the
        #: features said when the area was handed out or over.
        self.inflight_packed = False
        self.log = log

    # -- entry point ------------------------------------------------------------------------

    def handle(self, msg: Message) -> Message | None:
        """Apply ``msg``; return the reply to send, if any.

        Raises :class:`RemoteProtocolError` for anything the spec does not allow; the caller
        closes the connection. fds carried by ``msg`` are owned by the session from here on;
        fds carried by the reply (GET_INFLIGHT_FD) are the caller's to close once sent.
        """
        handler = getattr(self, "_on_" + msg.request.name.lower(), None)
        if handler is None:
            for fd in msg.fds:
                _close(fd)
            raise RemoteProtocolError(f"unsupported request {msg.request.name}")
        try:
            result: Message | None = handler(msg)
        except VirtioError as err:
            raise RemoteProtocolError(f"{msg.request.name}: {err}") from err
        if result is not None:
            return result
        if msg.need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
            return self._reply(msg, U64(0))
        return None

    def _reply(
        self,
        msg: Message,
        payload: U64 | VringState | ConfigSpace | Inflight,
        fds: tuple[int, ...] = (),
    ) -> Message:
        return Message(msg.request, payload, Flags.VERSION | Flags.REPLY, fds)

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < len(self.rings):
            raise RemoteProtocolError(f"vring {index} of {len(self.rings)}")
        return self.rings[index]

    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    # -- features and ownership -------------------------------------------------------------

    def offered_features(self) -> int:
        """GET_FEATURES: the device's features plus VHOST_USER_F_PROTOCOL_FEATURES."""
        return self.device.device_features() | 1 << F_PROTOCOL_FEATURES

    def _on_get_features(self, msg: Message) -> Message:
        return self._reply(msg, U64(self.offered_features()))

    def _on_set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        features = msg.payload.value
        extra = features & ~self.offered_features()
        if extra:
            raise RemoteProtocolError(f"SET_FEATURES acks unoffered bits {extra:#x}")
        packed = bool(features & (1 << F_RING_PACKED))
        if packed != self.device.packed_rings and any(ring.started for ring in self.rings):
            raise RemoteProtocolError("SET_FEATURES changes the ring layout of started vrings")
        self.features = features
        self.device.set_features(features & ~(1 << F_PROTOCOL_FEATURES))

    def _on_get_protocol_features(self, msg: Message) -> Message:
        return self._reply(msg, U64(self.offered_protocol_features))

    def _on_set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        extra = msg.payload.value & ~self.offered_protocol_features
        if extra:
            raise RemoteProtocolError(f"SET_PROTOCOL_FEATURES acks unoffered bits {extra:#x}")
        self.protocol_features = msg.payload.value

    def _on_set_owner(self, msg: Message) -> None:
        self.owner = True

    def _on_reset_owner(self, msg: Message) -> None:
        self.reset()

    def _on_reset_device(self, msg: Message) -> None:
        self.reset()

    def _on_get_queue_num(self, msg: Message) -> Message:
        return self._reply(msg, U64(len(self.rings)))

    def _on_get_max_mem_slots(self, msg: Message) -> Message:
        return self._reply(msg, U64(self.max_mem_slots))

    # -- status (VHOST_USER_PROTOCOL_F_STATUS) ----------------------------------------------

    def _on_set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        status = msg.payload.value & 0xFF
        if status == 0:
            self.needs_reset = False
        self.status = status

    def _on_get_status(self, msg: Message) -> Message:
        status = self.status
        if self.needs_reset:
            status |= DeviceStatus.DEVICE_NEEDS_RESET
        return self._reply(msg, U64(status))

    # -- config space (VHOST_USER_PROTOCOL_F_CONFIG) ----------------------------------------

    def _on_get_config(self, msg: Message) -> Message:
        assert isinstance(msg.payload, ConfigSpace)
        req = msg.payload
        space = self.device.read_config()
        data = space[req.offset : req.offset + req.size]
        data += bytes(req.size - len(data))
        return self._reply(msg, ConfigSpace(req.offset, req.size, req.flags, data))

    def _on_set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, ConfigSpace)
        self.device.write_config(msg.payload.offset, msg.payload.data)

    # -- memory -----------------------------------------------------------------------------

    def _set_memory(self, mem: GuestMemory) -> None:
        old = self.device.mem
        for queue in self.device.queues:
            queue.unbind()
        self.device.mem = mem
        if old is not mem:
            old.close()

    def _on_set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemTable)
        if len(msg.payload.regions) > self.max_mem_slots:
            for fd in msg.fds:
                _close(fd)
            raise RemoteProtocolError(
                f"{len(msg.payload.regions)} regions, {self.max_mem_slots} slots"
            )
        total = sum(r.memory_size for r in msg.payload.regions)
        if total > self.max_memory:
            for fd in msg.fds:
                _close(fd)
            raise RemoteProtocolError(f"{total} bytes of memory, the limit is {self.max_memory}")
        mem = GuestMemory()
        try:
            for region, fd in zip(msg.payload.regions, msg.fds, strict=True):
                mem.add(
                    MemoryRegion.map_fd(
                        fd,
                        region.guest_phys_addr,
                        region.memory_size,
                        region.userspace_addr,
                        region.mmap_offset,
                    )
                )
        except VirtioError:
            mem.close()
            raise
        finally:
            for fd in msg.fds:
                _close(fd)
        self._set_memory(mem)

    def _on_add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        region = msg.payload.region
        try:
            if len(self.device.mem) >= self.max_mem_slots:
                raise RemoteProtocolError(f"ADD_MEM_REG beyond {self.max_mem_slots} slots")
            total = sum(r.size for r in self.device.mem.regions) + region.memory_size
            if total > self.max_memory:
                raise RemoteProtocolError(f"ADD_MEM_REG beyond {self.max_memory} bytes")
            mapped = MemoryRegion.map_fd(
                msg.fds[0],
                region.guest_phys_addr,
                region.memory_size,
                region.userspace_addr,
                region.mmap_offset,
            )
        finally:
            _close(msg.fds[0])
        try:
            self.device.mem.add(mapped)
        except VirtioError:
            mapped.close()
            raise

    def _on_rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        for fd in msg.fds:
            _close(fd)
        region = msg.payload.region
        for queue in self.device.queues:
            queue.unbind()
        removed = self.device.mem.remove(
            region.guest_phys_addr, region.memory_size, region.userspace_addr
        )
        removed.close()

    # -- inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) -----------------------

    def _region_size(self, queue_size: int) -> int:
        """One queue's part of the inflight area, in the format of the negotiated rings."""
        if self.device.packed_rings:
            return packed_region_size(queue_size)
        return queue_region_size(queue_size)

    def _check_inflight(self, req: Inflight) -> int:
        size = req.queue_size
        if not 1 <= req.num_queues <= len(self.rings):
            raise RemoteProtocolError(f"inflight area for {req.num_queues} queues")
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise RemoteProtocolError(f"inflight area for queues of {size}")
        return req.num_queues * self._region_size(size)

    def _use_inflight(self, region: MemoryRegion, queue_size: int) -> None:
        for queue in self.device.queues:
            if isinstance(queue, PackedQueue):
                queue.attach_inflight(self.device.mem, None)
            else:
                assert isinstance(queue, SplitQueue)
                queue.attach_inflight(self.device.mem, None)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = region
        self.inflight_queue_size = queue_size
        self.inflight_packed = self.device.packed_rings

    def _on_get_inflight_fd(self, msg: Message) -> Message:
        """A fresh, zeroed area the frontend keeps and hands back to every backend instance."""
        assert isinstance(msg.payload, Inflight)
        size = self._check_inflight(msg.payload)
        fd = os.memfd_create("pvbus-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            region = MemoryRegion.map_fd(fd, 0, size, 0, 0)
        except (OSError, VirtioError):
            _close(fd)
            raise
        self._use_inflight(region, msg.payload.queue_size)
        reply = Inflight(size, 0, msg.payload.num_queues, msg.payload.queue_size)
        return self._reply(msg, reply, (fd,))

    def _on_set_inflight_fd(self, msg: Message) -> None:
        """The area of an earlier instance: rings resume from what it recorded."""
        assert isinstance(msg.payload, Inflight)
        req = msg.payload
        try:
            size = self._check_inflight(req)
            if req.mmap_size < size:
                raise RemoteProtocolError(f"inflight area of {req.mmap_size} bytes, need {size}")
            region = MemoryRegion.map_fd(msg.fds[0], 0, size, 0, req.mmap_offset)
        finally:
            _close(msg.fds[0])
        self._use_inflight(region, req.queue_size)

    def _inflight_for(self, index: int) -> SplitInflight | PackedInflight | None:
        area = self.inflight
        if area is None:
            return None
        packed = self.inflight_packed
        if packed != self.device.packed_rings:
            self.log.warning(
                "vring %d: the inflight area was made for %s rings: not tracked",
                index,
                "packed" if packed else "split",
            )
            return None
        qsize = self.inflight_queue_size
        span = packed_region_size(qsize) if packed else queue_region_size(qsize)
        if (index + 1) * span > area.size:
            return None
        size = self.device.queues[index].size
        if size > self.inflight_queue_size:
            # QEMU sizes the area by its queue-size property, but on virtio-mmio the driver
            # may pick a larger ring: track nothing rather than fail the ring.
            self.log.warning(
                "vring %d of %d entries exceeds the inflight area's %d: not tracked",
                index,
                size,
                self.inflight_queue_size,
            )
            return None
        view = area.buf[index * span : (index + 1) * span]
        if packed:
            return PackedInflight(view, qsize)
        return SplitInflight(view, qsize)

    # -- vrings -----------------------------------------------------------------------------

    def _on_set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        if self._ring(msg.payload.index).started:
            raise RemoteProtocolError(f"SET_VRING_NUM on started vring {msg.payload.index}")
        queue = self.device.queues[msg.payload.index]
        num = msg.payload.num
        if isinstance(queue, PackedQueue):  # any size up to 2**15 (VIRTIO 1.2 section 2.8)
            if not 1 <= num <= queue.max_size:
                raise RemoteProtocolError(f"vring size {num} (max {queue.max_size})")
        elif num < 1 or num > queue.max_size or num & (num - 1):
            raise RemoteProtocolError(f"vring size {num} (max {queue.max_size}, power of two)")
        queue.size = num

    def _on_set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        self._ring(msg.payload.index).addr = msg.payload

    def _on_set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        ring = self._ring(msg.payload.index)
        if ring.started:
            raise RemoteProtocolError(f"SET_VRING_BASE on started vring {msg.payload.index}")
        self.device.queues[msg.payload.index].set_base(msg.payload.num)

    def _on_get_vring_base(self, msg: Message) -> Message:
        assert isinstance(msg.payload, VringState)
        index = msg.payload.index
        ring = self._ring(index)
        self._stop_ring(index)
        _close(ring.kick_fd)
        ring.kick_fd = None
        queue = self.device.queues[index]
        # A packed ring's base holds both sides' positions and wrap counters (vhost-user.rst
        # "Vring descriptor indices for packed virtqueues"); a split ring's the next avail index.
        base = queue.vring_base() if isinstance(queue, PackedQueue) else queue.next_avail
        return self._reply(msg, VringState(index, base))

    def _vring_fd(self, msg: Message) -> tuple[int, Ring, int | None]:
        assert isinstance(msg.payload, U64)
        value = msg.payload.value
        index = value & VRING_IDX_MASK
        fd = None if value & VRING_NOFD_MASK else msg.fds[0]
        if index >= len(self.rings) or value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            _close(fd)
            raise RemoteProtocolError(f"{msg.request.name} for {value:#x}")
        return index, self.rings[index], fd

    def _on_set_vring_kick(self, msg: Message) -> None:
        index, ring, fd = self._vring_fd(msg)
        self._stop_ring(index)
        _close(ring.kick_fd)
        ring.kick_fd = fd
        ring.polled = fd is None
        self._start_ring(index)

    def _on_set_vring_call(self, msg: Message) -> None:
        _, ring, fd = self._vring_fd(msg)
        _close(ring.call_fd)
        ring.call_fd = fd

    def _on_set_vring_err(self, msg: Message) -> None:
        _, ring, fd = self._vring_fd(msg)
        _close(ring.err_fd)
        ring.err_fd = fd

    def _on_set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        index, enable = msg.payload.index, msg.payload.num
        ring = self._ring(index)
        if enable > 1:
            raise RemoteProtocolError(f"SET_VRING_ENABLE with {enable}")
        # QEMU's virtio-net sends this before SET_FEATURES (peer_attach at realize): refuse it
        # only once features were acked without VHOST_USER_F_PROTOCOL_FEATURES.
        if self.features and not self.features & (1 << F_PROTOCOL_FEATURES):
            raise RemoteProtocolError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if bool(enable) == ring.enabled:
            return
        if ring.started and ring.enabled:
            self.listener.ring_stopped(index)
            self.device.queue_stopped(index)
        ring.enabled = bool(enable)
        if ring.started and ring.enabled:
            self._activate(index)

    def _start_ring(self, index: int) -> None:
        ring = self.rings[index]
        if ring.addr is None:
            raise RemoteProtocolError(f"SET_VRING_KICK before SET_VRING_ADDR on vring {index}")
        queue = self.device.queues[index]
        mem = self.device.mem
        addr = ring.addr
        size = queue.size
        queue.desc_addr = mem.uaddr_to_gpa(addr.desc, 16 * size)
        inflight = self._inflight_for(index)
        if isinstance(queue, PackedQueue):
            # Driver and device areas: the event suppression structures (section 2.8.10).
            queue.avail_addr = mem.uaddr_to_gpa(addr.avail, 4)
            queue.used_addr = mem.uaddr_to_gpa(addr.used, 4)
            queue.unbind()
            assert not isinstance(inflight, SplitInflight)
            resubmit = queue.attach_inflight(mem, inflight)
        else:
            assert isinstance(queue, SplitQueue) and not isinstance(inflight, PackedInflight)
            queue.avail_addr = mem.uaddr_to_gpa(addr.avail, 6 + 2 * size)
            queue.used_addr = mem.uaddr_to_gpa(addr.used, 6 + 8 * size)
            queue.unbind()
            resubmit = queue.attach_inflight(mem, inflight)
        if resubmit:
            self.log.info("vring %d: resubmitting %d inflight requests", index, resubmit)
        queue.ready = True
        ring.started = True
        if not self.features & (1 << F_PROTOCOL_FEATURES):
            ring.enabled = True
        if ring.enabled:
            self._activate(index)

    def _activate(self, index: int) -> None:
        self.listener.ring_started(index, self.rings[index].kick_fd)
        self.device.queue_started(index)

    def _stop_ring(self, index: int) -> None:
        ring = self.rings[index]
        if ring.started:
            if ring.enabled:
                self.listener.ring_stopped(index)
                self.device.queue_stopped(index)
            ring.started = False
            self.device.queues[index].ready = False

    def ring_failed(self, index: int, err: Exception) -> None:
        """The device found ring ``index`` malformed: stop it and report DEVICE_NEEDS_RESET."""
        self.log.error("vring %d: %s; device needs reset", index, err)
        self._stop_ring(index)
        self.needs_reset = True
        err_fd = self.rings[index].err_fd
        if err_fd is not None:
            with contextlib.suppress(OSError):
                os.eventfd_write(err_fd, 1)

    def call_fd(self, index: int) -> int | None:
        """The eventfd that interrupts the driver for ring ``index``."""
        return self.rings[index].call_fd

    # -- teardown ---------------------------------------------------------------------------

    def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE: stop every ring, forget features, reset the device."""
        for index, ring in enumerate(self.rings):
            self._stop_ring(index)
            for fd in (ring.kick_fd, ring.call_fd, ring.err_fd):
                _close(fd)
            self.rings[index] = Ring()
        self.features = 0
        self.status = 0
        self.needs_reset = False
        self.device.reset()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None

    def close(self) -> None:
        """The connection is gone: stop rings, close every fd, unmap memory."""
        self.reset()
        self.protocol_features = 0
        self._set_memory(GuestMemory())


__all__ = ["BACKEND_PROTOCOL_FEATURES", "BackendSession", "Limits", "RingListener"]
