"""virtio-vsock (VIRTIO 1.2 section 5.10), hybrid style: guest ports meet host Unix sockets.

As in Firecracker and vhost-device-vsock, the host side is plain Unix sockets under one path
``uds_path``:

* host to guest: a host process connects to ``uds_path`` and writes ``CONNECT <port>\\n``;
  the device sends the guest a REQUEST for that port from a fresh host port and, once the
  guest answers RESPONSE, writes ``OK <host port>\\n`` back. A guest refusal (RST) or no answer
  within :data:`CONNECT_TIMEOUT` closes the host socket.
* guest to host: a guest connecting to host CID 2, port ``P`` reaches ``<uds_path>_<P>``; a
  refused or missing socket is answered with RST.

Stream sockets only (VIRTIO_VSOCK_F_SEQPACKET is not offered). Credit-based flow control
(5.10.6.3): every packet to the guest carries this side's ``buf_alloc`` and ``fwd_cnt``; data to
the guest never exceeds the guest's advertised credit; forwarded bytes are reported with
CREDIT_UPDATE well before the guest could run dry, and CREDIT_REQUEST is answered. A guest
that exceeds its credit, or a packet for an unknown connection, gets RST; malformed packets
(short header, unknown type or op, wrong addresses) are dropped or reset, never a crash.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pvbus.devices.base import COMMON_FEATURES, VirtioDevice
from pvbus.virtio.constants import DeviceId
from pvbus.virtio.errors import GuestMemoryError, QueueError
from pvbus.virtio.memory import GuestMemory
from pvbus.virtio.split import DescriptorChain

log = logging.getLogger(__name__)

#: struct virtio_vsock_hdr (5.10.6): src_cid, dst_cid, src_port, dst_port, len, type, op,
#: flags, buf_alloc, fwd_cnt.
HEADER = struct.Struct("<QQIIIHHIII")
CONFIG = struct.Struct("<Q")

HOST_CID = 2
TYPE_STREAM = 1
TYPE_SEQPACKET = 2

OP_INVALID = 0
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7

SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

Q_RX, Q_TX, Q_EVENT = 0, 1, 2

#: First host port handed to host-initiated connections (like Firecracker, far above the
#: ports a guest service listens on).
LOCAL_PORT_BASE = 1 << 30
#: Seconds a host-initiated connection waits for the guest's RESPONSE.
CONNECT_TIMEOUT = 5.0
#: Longest ``CONNECT <port>\n`` line.
MAX_CONNECT_LINE = 64
#: Seconds between retries of output the host socket could not take.
FLUSH_RETRY = 0.005
#: Largest payload read from a host socket for one packet.
MAX_PACKET = 64 * 1024


@dataclass(frozen=True, slots=True)
class VsockConfig:
    """Validated configuration of one virtio-vsock device."""

    guest_cid: int
    uds_path: str
    buf_alloc: int = 256 * 1024
    queue_size: int = 1024

    def __post_init__(self) -> None:
        if not 3 <= self.guest_cid < 0xFFFFFFFF:
            raise ValueError(f"guest CID {self.guest_cid} is not in 3..0xfffffffe")
        if not self.uds_path:
            raise ValueError("--uds-path is required")
        if len(os.fsencode(self.uds_path)) + 12 > 107:
            raise ValueError(f"uds path {self.uds_path!r} is too long for a Unix socket")
        if not 4096 <= self.buf_alloc <= 1 << 30:
            raise ValueError(f"buf-alloc {self.buf_alloc} is not in 4096..2**30")
        qs = self.queue_size
        if qs < 2 or qs > 32768 or qs & (qs - 1):
            raise ValueError(f"queue-size {qs} is not a power of two in 2..32768")


class Connection:
    """One stream between a guest port and a host Unix socket.

    ``local_port`` is the host-side vsock port, ``peer_port`` the guest's.
    """

    __slots__ = (
        "connecting",
        "fwd_cnt",
        "host_eof",
        "inbuf",
        "last_fwd_reported",
        "local_port",
        "outbound",
        "outbuf",
        "peer_buf_alloc",
        "peer_fwd_cnt",
        "peer_port",
        "peer_shutdown",
        "reading",
        "rx_bytes",
        "sock",
        "tx_bytes",
        "tx_cnt",
    )

    def __init__(self, sock: socket.socket, local_port: int, peer_port: int) -> None:
        self.sock = sock
        self.local_port = local_port
        self.peer_port = peer_port
        #: True until the guest answered a host-initiated REQUEST.
        self.connecting = False
        #: Host-initiated (the host wrote CONNECT).
        self.outbound = False
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        #: Payload bytes sent to the guest / forwarded from the guest to the host.
        self.tx_cnt = 0
        self.fwd_cnt = 0
        self.last_fwd_reported = 0
        #: Host data read but not yet in the guest's buffers.
        self.inbuf = bytearray()
        #: Guest data the host socket has not taken yet.
        self.outbuf = bytearray()
        self.reading = False
        self.host_eof = False
        self.peer_shutdown = 0
        self.rx_bytes = 0
        self.tx_bytes = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def credit(self) -> int:
        """Bytes the guest can take now (5.10.6.3.1)."""
        return max(0, self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF))


class VsockDevice(VirtioDevice):
    """A virtio-vsock device model with Unix-socket host ports."""

    device_id = DeviceId.VSOCK
    name = "vsock"

    def __init__(self, config: VsockConfig) -> None:
        super().__init__(3, config.queue_size)
        self.config = config
        self.cid = config.guest_cid
        self.conns: dict[tuple[int, int], Connection] = {}
        self._control: deque[bytes] = deque()
        self._ready: deque[Connection] = deque()
        self._pending_host: dict[int, tuple[socket.socket, bytearray]] = {}
        self._active: set[int] = set()
        self._next_local = LOCAL_PORT_BASE
        self._flush_armed = False
        self._filling = False
        self._failed: dict[int, QueueError] = {}
        self._started = False
        #: Malformed or refused packets from the guest.
        self.errors = 0
        self.listener = _listen(config.uds_path)

    def close(self) -> None:
        """Close every connection and the listening socket."""
        self._close_all()
        for sock, _ in self._pending_host.values():
            self._unwatch(sock)
            sock.close()
        self._pending_host.clear()
        if self.reactor is not None and self._started:
            self.reactor.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.config.uds_path)

    # -- features and config (5.10.3, 5.10.4) -----------------------------------------------

    def device_features(self) -> int:
        return COMMON_FEATURES

    def read_config(self) -> bytes:
        return CONFIG.pack(self.cid)

    # -- queue life cycle -------------------------------------------------------------------

    def queue_started(self, index: int) -> None:
        self._active.add(index)
        self._failed.pop(index, None)
        if not self._started and self.reactor is not None:
            self._started = True
            self.listener.setblocking(False)
            self.reactor.add_reader(self.listener.fileno(), self._accept)
        if index == Q_RX:
            self._safely(self._fill_rx)

    def queue_stopped(self, index: int) -> None:
        self._active.discard(index)

    def reset_device(self) -> None:
        # The guest's sockets are gone: so are the host ends (5.10.6.6: a reset drops all).
        self._close_all()
        self._active.clear()
        self._failed.clear()

    def _close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self._control.clear()
        self._ready.clear()

    # -- the data path ----------------------------------------------------------------------

    def process(self, index: int) -> None:
        if not 0 <= index < 3:
            raise QueueError(f"queue {index} of 3")
        err = self._failed.pop(index, None)
        if err is not None:
            raise err
        if index == Q_TX:
            self.drain(Q_TX, lambda q, m: self._take_tx())
            self._fill_rx()
        elif index == Q_RX:
            self._fill_rx()
        # The event queue holds buffers for TRANSPORT_RESET, which this device never sends.

    def _safely(self, action: Callable[[], None]) -> None:
        """Run queue work started by the host side; keep a ring error for the next kick."""
        try:
            action()
        except QueueError as err:
            log.error("vsock: %s", err)
            self._failed[Q_RX] = err

    # guest -> device

    def _take_tx(self) -> int:
        queue, mem, done = self.queues[Q_TX], self.mem, 0
        if Q_TX not in self._active:
            return 0
        while (chain := queue.pop(mem)) is not None:
            packet = _gather(chain, mem)
            queue.add_used(mem, chain.head, 0)
            done += 1
            self.queue_stats[Q_TX].bytes += len(packet)
            self._packet(packet)
        return done

    def _packet(self, packet: bytes) -> None:
        if len(packet) < HEADER.size:
            self.errors += 1
            log.warning("vsock: packet of %d bytes dropped (short header)", len(packet))
            return
        (src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt) = (
            HEADER.unpack_from(packet)
        )
        payload = packet[HEADER.size : HEADER.size + length]
        if src_cid != self.cid or dst_cid != HOST_CID:
            self.errors += 1
            log.warning("vsock: packet %d->%d dropped (wrong CIDs)", src_cid, dst_cid)
            return
        if len(payload) != length:
            self.errors += 1
            log.warning("vsock: packet says %d bytes, carries %d", length, len(payload))
            if op != OP_RST:
                self._rst(dst_port, src_port)
            return
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if ptype != TYPE_STREAM:
            self.errors += 1
            if op != OP_RST:
                self._rst(dst_port, src_port, ptype)
            if conn is not None:
                self._drop(conn)
            return
        if op == OP_REQUEST:
            if conn is not None:
                self.errors += 1
                self._reset(conn)
                return
            self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if conn is None:
            if op != OP_RST:
                self.errors += 1
                self._rst(dst_port, src_port)
            return
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if conn.inbuf and not conn.connecting and conn.credit() > 0:
            self._ready.append(conn)  # data held back for lack of credit may go now
        if op == OP_RESPONSE:
            if not conn.connecting:
                self.errors += 1
                self._reset(conn)
                return
            conn.connecting = False
            self._host_established(conn)
        elif op == OP_RST:
            self._drop(conn)
            return
        elif conn.connecting:
            self.errors += 1
            self._reset(conn)
            return
        elif op == OP_RW:
            self._from_guest(conn, payload)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(conn, flags)
        elif op == OP_CREDIT_REQUEST:
            self._send(conn, OP_CREDIT_UPDATE)
        elif op == OP_CREDIT_UPDATE:
            pass  # the credit fields were taken above
        else:
            self.errors += 1
            self._reset(conn)
            return
        self._want_read(conn)

    def _guest_connect(self, local: int, peer: int, buf_alloc: int, fwd_cnt: int) -> None:
        path = f"{self.config.uds_path}_{local}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as err:
            sock.close()
            log.info("vsock: guest port %d -> %s: %s; RST", peer, path, err.strerror or err)
            self._rst(local, peer)
            return
        conn = Connection(sock, local, peer)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self.conns[conn.key] = conn
        log.info("vsock: guest port %d connected to %s", peer, path)
        self._send(conn, OP_RESPONSE)
        self._want_read(conn)

    def _from_guest(self, conn: Connection, payload: bytes) -> None:
        if conn.peer_shutdown & SHUTDOWN_SEND:
            self.errors += 1
            self._reset(conn)
            return
        conn.rx_bytes += len(payload)
        conn.outbuf += payload
        if len(conn.outbuf) > self.config.buf_alloc:
            log.warning("vsock: guest port %d overran its credit; RST", conn.peer_port)
            self.errors += 1
            self._reset(conn)
            return
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Write what the guest sent to the host socket; report credit freed."""
        if conn.outbuf:
            try:
                n = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                n = 0
            except OSError as err:
                log.info("vsock: host socket of port %d: %s; RST", conn.local_port, err)
                self._reset(conn)
                return
            del conn.outbuf[:n]
            conn.fwd_cnt = (conn.fwd_cnt + n) & 0xFFFFFFFF
            if conn.outbuf:
                self._arm_flush()
        unreported = (conn.fwd_cnt - conn.last_fwd_reported) & 0xFFFFFFFF
        if unreported >= self.config.buf_alloc // 4:
            self._send(conn, OP_CREDIT_UPDATE)
        if not conn.outbuf and conn.peer_shutdown & SHUTDOWN_SEND:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._maybe_finish(conn)

    def _arm_flush(self) -> None:
        if not self._flush_armed and self.reactor is not None:
            self._flush_armed = True
            self.reactor.call_later(FLUSH_RETRY, self._retry_flush)

    def _retry_flush(self) -> None:
        self._flush_armed = False
        for conn in list(self.conns.values()):
            if conn.outbuf and conn.key in self.conns:
                self._flush(conn)
        self._safely(self._fill_rx)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
        if conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND:
            # The guest closed its socket: flush what it sent, then answer RST (5.10.6.5).
            self._flush_blocking(conn)
            self._reset(conn)
            return
        if conn.peer_shutdown & SHUTDOWN_SEND:
            self._flush(conn)

    def _flush_blocking(self, conn: Connection) -> None:
        if conn.outbuf:
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.outbuf)
            except OSError:
                pass
            conn.outbuf.clear()

    def _maybe_finish(self, conn: Connection) -> None:
        if conn.host_eof and conn.peer_shutdown & SHUTDOWN_SEND and not conn.outbuf:
            self._reset(conn)

    # host -> device

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("vsock: accept on %s: %s", self.config.uds_path, err)
            return
        sock.setblocking(False)
        self._pending_host[sock.fileno()] = (sock, bytearray())
        assert self.reactor is not None
        self.reactor.add_reader(sock.fileno(), lambda: self._connect_line(sock))

    def _connect_line(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        _, line = self._pending_host[fd]
        try:
            data = sock.recv(MAX_CONNECT_LINE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        line += data
        nl = line.find(b"\n")
        if not data or (nl < 0 and len(line) >= MAX_CONNECT_LINE):
            self._refuse_host(sock, "no CONNECT line")
            return
        if nl < 0:
            return
        words = line[:nl].split()
        rest = bytes(line[nl + 1 :])
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
            self._refuse_host(sock, f"bad request {bytes(line[:nl])!r}")
            return
        port = int(words[1])
        if port > 0xFFFFFFFF or Q_RX not in self._active:
            self._refuse_host(sock, f"port {port} unreachable (guest driver not ready)")
            return
        self._unwatch(sock)
        del self._pending_host[fd]
        local = self._allocate_port(port)
        conn = Connection(sock, local, port)
        conn.connecting = True
        conn.outbound = True
        conn.inbuf += rest  # sent once the guest accepted
        self.conns[conn.key] = conn
        log.info("vsock: host connecting to guest port %d from %d", port, local)
        self._send(conn, OP_REQUEST)
        assert self.reactor is not None
        self.reactor.call_later(CONNECT_TIMEOUT, lambda: self._connect_timeout(conn))

    def _refuse_host(self, sock: socket.socket, why: str) -> None:
        log.info("vsock: host connection refused: %s", why)
        self._unwatch(sock)
        self._pending_host.pop(sock.fileno(), None)
        sock.close()

    def _unwatch(self, sock: socket.socket) -> None:
        if self.reactor is not None:
            self.reactor.remove_reader(sock.fileno())

    def _allocate_port(self, peer: int) -> int:
        while True:
            local = self._next_local
            self._next_local = (
                LOCAL_PORT_BASE if self._next_local >= 0xFFFFFFFE else self._next_local + 1
            )
            if (local, peer) not in self.conns:
                return local

    def _connect_timeout(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn and conn.connecting:
            log.info("vsock: guest port %d did not answer; giving up", conn.peer_port)
            self._reset(conn)
            self._safely(self._fill_rx)

    def _host_established(self, conn: Connection) -> None:
        ok = f"OK {conn.local_port}\n".encode()
        try:
            conn.sock.send(ok)
        except OSError:
            self._reset(conn)
            return
        if conn.inbuf:
            self._ready.append(conn)

    def _want_read(self, conn: Connection) -> None:
        """Watch the host socket while the guest has credit and nothing is waiting."""
        want = (
            not conn.connecting
            and not conn.host_eof
            and not conn.inbuf
            and conn.credit() > 0
            and conn.key in self.conns
        )
        if want and not conn.reading and self.reactor is not None:
            self.reactor.add_reader(conn.sock.fileno(), lambda: self._host_readable(conn))
            conn.reading = True
        elif not want and conn.reading:
            self._unwatch(conn.sock)
            conn.reading = False

    def _host_readable(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is not conn:
            return
        credit = conn.credit()
        if credit <= 0:
            self._send(conn, OP_CREDIT_REQUEST)
            self._want_read(conn)
            return
        try:
            data = conn.sock.recv(min(credit, MAX_PACKET))
        except BlockingIOError:
            return
        except OSError as err:
            log.info("vsock: host socket of port %d: %s; RST", conn.local_port, err)
            self._reset(conn)
            self._safely(self._fill_rx)
            return
        if not data:
            conn.host_eof = True
            self._send(conn, OP_SHUTDOWN, flags=SHUTDOWN_SEND)
            self._want_read(conn)
            self._maybe_finish(conn)
        else:
            conn.inbuf += data
            self._ready.append(conn)
            self._want_read(conn)
        self._safely(self._fill_rx)

    # device -> guest

    def _header(
        self, conn_local: int, conn_peer: int, op: int, length: int = 0, **kw: int
    ) -> bytes:
        return HEADER.pack(
            HOST_CID,
            self.cid,
            conn_local,
            conn_peer,
            length,
            kw.get("ptype", TYPE_STREAM),
            op,
            kw.get("flags", 0),
            kw.get("buf_alloc", 0),
            kw.get("fwd_cnt", 0),
        )

    def _send(self, conn: Connection, op: int, flags: int = 0) -> None:
        """Queue a control packet for the guest, carrying this side's credit."""
        conn.last_fwd_reported = conn.fwd_cnt
        self._control.append(
            self._header(
                conn.local_port,
                conn.peer_port,
                op,
                flags=flags,
                buf_alloc=self.config.buf_alloc,
                fwd_cnt=conn.fwd_cnt,
            )
        )
        self._safely(self._fill_rx)

    def _rst(self, local: int, peer: int, ptype: int = TYPE_STREAM) -> None:
        self._control.append(self._header(local, peer, OP_RST, ptype=ptype))
        self._safely(self._fill_rx)

    def _reset(self, conn: Connection) -> None:
        """Send RST for ``conn`` and forget it."""
        self._rst(conn.local_port, conn.peer_port)
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.reading:
            self._unwatch(conn.sock)
            conn.reading = False
        conn.inbuf.clear()
        conn.outbuf.clear()
        conn.sock.close()

    def _fill_rx(self) -> None:
        if self._filling or Q_RX not in self._active or not (self._control or self._ready):
            return  # (a packet queued while filling is picked up by the running loop)
        queue, mem = self.queues[Q_RX], self.mem
        done = 0
        self._filling = True
        try:
            while True:
                queue.set_notification(mem, False)
                done += self._give_rx()
                if not (self._control or self._ready):
                    queue.set_notification(mem, True)
                    break
                if not queue.set_notification(mem, True):
                    break
        finally:
            self._filling = False
        if done:
            self.queue_stats[Q_RX].requests += done
            self.signal(Q_RX)

    def _give_rx(self) -> int:
        queue, mem, done = self.queues[Q_RX], self.mem, 0
        control, ready = self._control, self._ready
        while control or ready:
            if not control:
                conn = ready[0]
                if self.conns.get(conn.key) is not conn or not conn.inbuf:
                    ready.popleft()
                    continue
                if conn.credit() <= 0:
                    ready.popleft()  # resumed by the guest's next credit update
                    self._send(conn, OP_CREDIT_REQUEST)
                    continue
            chain = queue.pop(mem)
            if chain is None:
                break
            room = sum(n for _, n in chain.writable)
            if room < HEADER.size:
                # A receive buffer too small for a header is the driver's bug; skip it.
                self.errors += 1
                queue.add_used(mem, chain.head, 0)
                done += 1
                continue
            if control:
                packet = control.popleft()
            else:
                conn = ready[0]
                n = min(len(conn.inbuf), conn.credit(), room - HEADER.size)
                data = bytes(conn.inbuf[:n])
                del conn.inbuf[:n]
                conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
                conn.tx_bytes += n
                conn.last_fwd_reported = conn.fwd_cnt
                packet = (
                    self._header(
                        conn.local_port,
                        conn.peer_port,
                        OP_RW,
                        n,
                        buf_alloc=self.config.buf_alloc,
                        fwd_cnt=conn.fwd_cnt,
                    )
                    + data
                )
                if not conn.inbuf:
                    ready.popleft()
                    self._want_read(conn)
            _scatter(chain, mem, packet)
            queue.add_used(mem, chain.head, len(packet))
            self.queue_stats[Q_RX].bytes += len(packet)
            done += 1
        return done


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)
            else:
                raise ValueError(f"{path} is in use by a running backend")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"{path} exists and is not a socket") from err
        raise ValueError(f"cannot listen on {path}: {err.strerror}") from err
    return sock


def _gather(chain: DescriptorChain, mem: GuestMemory) -> bytes:
    out = bytearray()
    for addr, length in chain.readable:
        try:
            out += mem.translate(addr, length)
        except GuestMemoryError as err:
            raise QueueError(f"chain {chain.head}: {err}") from err
    return bytes(out)


def _scatter(chain: DescriptorChain, mem: GuestMemory, data: bytes) -> None:
    done = 0
    for addr, length in chain.writable:
        n = min(length, len(data) - done)
        if n <= 0:
            break
        try:
            mem.translate(addr, n)[:] = data[done : done + n]
        except GuestMemoryError as err:
            raise QueueError(f"chain {chain.head}: {err}") from err
        done += n
