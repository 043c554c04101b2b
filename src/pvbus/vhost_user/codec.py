"""Bytes and file descriptors to :class:`Message` s and back (vhost-user.rst "Message format").

:class:`MessageReader` is fed what arrived on the socket, bytes plus the fds that came with
them, in chunks of any size; it yields whole messages. On a Unix stream socket a ``recvmsg``
may return several messages but stops right after one that carried fds (each sender sends a
message with one ``sendmsg``), so the reader files a chunk's fds under the chunk's last byte
and gives each message the fds filed within its bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Literal

from pvbus.vhost_user.errors import LocalProtocolError, RemoteProtocolError
from pvbus.vhost_user.messages import (
    HEADER,
    MAX_PAYLOAD,
    PAYLOADS,
    U64,
    AnyPayload,
    Flags,
    Message,
    Request,
    expected_fds,
)

Role = Literal["backend", "frontend"]


def encode(msg: Message) -> tuple[bytes, tuple[int, ...]]:
    """The bytes and fds to send for ``msg``."""
    body = msg.payload.pack()
    if len(body) > MAX_PAYLOAD:
        raise LocalProtocolError(f"{msg.request.name} payload of {len(body)} bytes")
    return HEADER.pack(msg.request, msg.flags, len(body)) + body, msg.fds


class MessageReader:
    """Incremental decoder for one connection.

    ``role`` is who reads: a backend decodes requests, a frontend decodes replies (the reply's
    payload kind is looked up from its request code). A malformed message raises
    :class:`RemoteProtocolError`; fds that belong to no message are handed back by
    :meth:`close` so the caller can close them.
    """

    def __init__(self, role: Role) -> None:
        self.role = role
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self._fds: deque[tuple[int, int]] = deque()  # (stream offset, fd)
        self._messages: deque[Message] = deque()

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed bytes and the fds that arrived with them; parse every whole message."""
        # The kernel ends a recvmsg() right after the message that carried fds, so they belong
        # to the message holding the chunk's last byte.
        at = self._offset + len(self._buf) + max(len(data) - 1, 0)
        for fd in fds:
            self._fds.append((at, fd))
        self._buf += data
        while len(self._buf) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buf)
            if size > MAX_PAYLOAD:
                raise RemoteProtocolError(f"message {request} with a payload of {size} bytes")
            end = HEADER.size + size
            if len(self._buf) < end:
                return
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            start = self._offset
            self._offset += end
            taken: list[int] = []
            while self._fds and self._fds[0][0] < self._offset:
                pos, fd = self._fds.popleft()
                if pos >= start:
                    taken.append(fd)
            self._messages.append(self._decode(request, flags, body, tuple(taken)))

    def _decode(self, code: int, flags: int, body: bytes, fds: tuple[int, ...]) -> Message:
        try:
            request = Request(code)
            spec = PAYLOADS[request]
        except (ValueError, KeyError) as err:
            raise RemoteProtocolError(f"unsupported request {code}", fds) from err
        if flags & 0x3 != Flags.VERSION:
            raise RemoteProtocolError(f"{request.name}: bad version flags {flags:#x}", fds)
        is_reply = bool(flags & Flags.REPLY)
        if is_reply != (self.role == "frontend"):
            what = "reply" if is_reply else "request"
            raise RemoteProtocolError(f"unexpected {what} {request.name}", fds)
        # A reply to a request that has none of its own is a REPLY_ACK: a u64, 0 for success.
        kind = (spec.reply or U64) if is_reply else spec.payload
        payload: AnyPayload
        try:
            if is_reply and flags & Flags.NEED_REPLY:
                raise RemoteProtocolError("reply asks for a reply")
            payload = kind.unpack(body)
        except (RemoteProtocolError, ValueError) as err:
            raise RemoteProtocolError(f"{request.name}: {err}", fds) from err
        if not is_reply:
            least, most = expected_fds(request, payload)
            if not least <= len(fds) <= most:
                raise RemoteProtocolError(
                    f"{request.name} with {len(fds)} fds, expected {least}", fds
                )
        elif len(fds) > (1 if request is Request.GET_INFLIGHT_FD else 0):
            # Only GET_INFLIGHT_FD's reply carries an fd: one (none for an empty area).
            raise RemoteProtocolError(f"{request.name} reply with {len(fds)} fds", fds)
        return Message(request, payload, flags, fds)

    def next_message(self) -> Message | None:
        """The next whole message, or ``None`` until more data arrives."""
        return self._messages.popleft() if self._messages else None

    def close(self) -> list[int]:
        """Give back every fd not handed out in a message (the caller closes them)."""
        leftover = [fd for _, fd in self._fds]
        for msg in self._messages:
            leftover.extend(msg.fds)
        self._fds.clear()
        self._messages.clear()
        return leftover
