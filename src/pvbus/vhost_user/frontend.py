"""The frontend side of vhost-user as a state machine (vhost-user.rst, front-end behaviour).

:class:`FrontendSession` is the other role of the protocol :class:`BackendSession` speaks: it
turns requests into bytes and fds (:meth:`FrontendSession.send`), decodes what the backend
answers with the same codec (``MessageReader("frontend")``), and checks each reply against
what it sent and still expects back, in order. It tracks what has been negotiated, so a
request the negotiated features do not allow is refused before it reaches the wire
(:class:`LocalProtocolError`), and a reply nobody asked for is the backend's fault
(:class:`RemoteProtocolError`). It never touches a socket; :mod:`pvbus.frontend` does.

Rules enforced (vhost-user.rst "Protocol features", "Communication"):

- GET/SET_PROTOCOL_FEATURES only when the backend offered VHOST_USER_F_PROTOCOL_FEATURES,
  and SET_PROTOCOL_FEATURES / SET_FEATURES only with bits the backend offered;
- GET/SET_CONFIG need CONFIG, GET_QUEUE_NUM needs MQ, RESET_DEVICE needs RESET_DEVICE,
  GET/SET_STATUS need STATUS, ADD/REM_MEM_REG and GET_MAX_MEM_SLOTS need CONFIGURE_MEM_SLOTS,
  SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES acknowledged;
- NEED_REPLY is set only with REPLY_ACK negotiated, and only on requests without a reply of
  their own (for those the flag would be ignored);
- replies come in request order, each with the request code it answers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import LocalProtocolError, RemoteProtocolError
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    PAYLOADS,
    U64,
    AnyPayload,
    ConfigSpace,
    Empty,
    Flags,
    Inflight,
    Message,
    ProtocolFeature,
    Request,
    VringState,
    expected_fds,
)

#: Protocol features a pvbus frontend can use, asked for when offered.
FRONTEND_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.RESET_DEVICE
    | 1 << ProtocolFeature.STATUS
)

#: Requests that need a protocol feature negotiated first.
_NEEDS: dict[Request, ProtocolFeature] = {
    Request.GET_CONFIG: ProtocolFeature.CONFIG,
    Request.SET_CONFIG: ProtocolFeature.CONFIG,
    Request.GET_QUEUE_NUM: ProtocolFeature.MQ,
    Request.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    Request.SET_STATUS: ProtocolFeature.STATUS,
    Request.GET_STATUS: ProtocolFeature.STATUS,
    Request.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    Request.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
    Request.SET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
}


class SessionState(Enum):
    """Where the session is: usable, closed by us, or broken by a protocol error."""

    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    """A backend's answer to one request: its payload, or a REPLY_ACK status (0 is success)."""

    request: Request
    payload: U64 | VringState | ConfigSpace | Inflight
    fds: tuple[int, ...] = ()
    is_ack: bool = False

    @property
    def ok(self) -> bool:
        """False only for a REPLY_ACK carrying a non-zero (failure) status."""
        return not (self.is_ack and isinstance(self.payload, U64) and self.payload.value != 0)


@dataclass(frozen=True, slots=True)
class _Pending:
    request: Request
    is_ack: bool


class FrontendSession:
    """One backend connection's protocol state, frontend side."""

    def __init__(self) -> None:
        self.reader = MessageReader("frontend")
        self.state = SessionState.OPEN
        #: GET_FEATURES reply (None until it arrives).
        self.backend_features: int | None = None
        #: Features acknowledged with SET_FEATURES.
        self.features = 0
        #: GET_PROTOCOL_FEATURES reply (None until it arrives).
        self.backend_protocol_features: int | None = None
        #: Protocol features acknowledged with SET_PROTOCOL_FEATURES.
        self.protocol_features = 0
        self._pending: deque[_Pending] = deque()
        self._replies: deque[Reply] = deque()
        self.sent = 0

    # -- what is negotiated -----------------------------------------------------------------

    def has(self, feature: ProtocolFeature) -> bool:
        """Whether protocol ``feature`` was negotiated."""
        return bool(self.protocol_features & (1 << feature))

    @property
    def protocol_features_acked(self) -> bool:
        """Whether VHOST_USER_F_PROTOCOL_FEATURES is acknowledged (rings start disabled)."""
        return bool(self.features & (1 << F_PROTOCOL_FEATURES))

    @property
    def awaiting(self) -> int:
        """Replies still expected."""
        return len(self._pending)

    # -- sending ----------------------------------------------------------------------------

    def send(
        self,
        request: Request,
        payload: AnyPayload | None = None,
        fds: Iterable[int] = (),
        *,
        need_reply: bool = False,
    ) -> tuple[bytes, tuple[int, ...], bool]:
        """Encode ``request``; return (bytes, fds, whether a reply will come).

        ``need_reply`` asks for a REPLY_ACK when that protocol feature is negotiated (it is
        dropped otherwise, and on requests that have a reply of their own).
        """
        if self.state is not SessionState.OPEN:
            raise LocalProtocolError(f"{request.name} on a {self.state.value} session")
        spec = PAYLOADS.get(request)
        if spec is None:
            raise LocalProtocolError(f"{request.name} is not supported")
        if payload is None:
            payload = Empty()
        if not isinstance(payload, spec.payload):
            raise LocalProtocolError(
                f"{request.name} carries {spec.payload.__name__}, not {type(payload).__name__}"
            )
        fds = tuple(fds)
        least, most = expected_fds(request, payload)
        if not least <= len(fds) <= most:
            raise LocalProtocolError(f"{request.name} with {len(fds)} fds, expected {least}")
        self._check_allowed(request, payload)
        flags = Flags.VERSION
        ack = False
        if spec.reply is None and need_reply and self.has(ProtocolFeature.REPLY_ACK):
            flags |= Flags.NEED_REPLY
            ack = True
        data, out_fds = encode(Message(request, payload, flags, fds))
        # Effects the backend applies on receipt (replies come in order, so this is safe).
        if request is Request.SET_FEATURES:
            assert isinstance(payload, U64)
            self.features = payload.value
        elif request is Request.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            self.protocol_features = payload.value
        elif request in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self.features = 0
        expects = spec.reply is not None or ack
        if expects:
            self._pending.append(_Pending(request, ack))
        self.sent += 1
        return data, out_fds, expects

    def _check_allowed(self, request: Request, payload: AnyPayload) -> None:
        offered = self.backend_features
        if request in (Request.GET_PROTOCOL_FEATURES, Request.SET_PROTOCOL_FEATURES) and (
            offered is None or not offered & (1 << F_PROTOCOL_FEATURES)
        ):
            raise LocalProtocolError(
                f"{request.name}: the backend did not offer VHOST_USER_F_PROTOCOL_FEATURES"
            )
        if request is Request.SET_FEATURES:
            assert isinstance(payload, U64)
            if offered is None:
                raise LocalProtocolError("SET_FEATURES before GET_FEATURES")
            extra = payload.value & ~offered
            if extra:
                raise LocalProtocolError(f"SET_FEATURES with unoffered bits {extra:#x}")
        elif request is Request.SET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            if self.backend_protocol_features is None:
                raise LocalProtocolError("SET_PROTOCOL_FEATURES before GET_PROTOCOL_FEATURES")
            extra = payload.value & ~self.backend_protocol_features
            if extra:
                raise LocalProtocolError(f"SET_PROTOCOL_FEATURES with unoffered bits {extra:#x}")
        elif request is Request.SET_VRING_ENABLE and not self.protocol_features_acked:
            raise LocalProtocolError(
                "SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES acknowledged"
            )
        needed = _NEEDS.get(request)
        if needed is not None and not self.has(needed):
            raise LocalProtocolError(f"{request.name} needs protocol feature {needed.name}")

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes, fds: Iterable[int] = ()) -> None:
        """Feed what arrived on the socket; an empty ``data`` means the backend hung up."""
        if self.state is SessionState.ERROR:
            raise LocalProtocolError("receive_data on a session that failed")
        if not data:
            self.state = SessionState.CLOSED
            if self._pending:
                waiting = ", ".join(p.request.name for p in self._pending)
                raise RemoteProtocolError(f"backend closed the connection awaiting {waiting}")
            return
        try:
            self.reader.receive_data(data, fds)
            while (msg := self.reader.next_message()) is not None:
                self._replies.append(self._match(msg))
        except RemoteProtocolError:
            self.state = SessionState.ERROR
            raise

    def _match(self, msg: Message) -> Reply:
        if not self._pending:
            raise RemoteProtocolError(f"unexpected reply to {msg.request.name}", msg.fds)
        want = self._pending[0]
        if msg.request is not want.request:
            raise RemoteProtocolError(
                f"reply to {msg.request.name} while awaiting {want.request.name}", msg.fds
            )
        self._pending.popleft()
        payload = msg.payload
        assert isinstance(payload, U64 | VringState | ConfigSpace | Inflight)
        if msg.request is Request.GET_FEATURES:
            assert isinstance(payload, U64)
            self.backend_features = payload.value
        elif msg.request is Request.GET_PROTOCOL_FEATURES:
            assert isinstance(payload, U64)
            self.backend_protocol_features = payload.value
        return Reply(msg.request, payload, msg.fds, want.is_ack)

    def next_reply(self) -> Reply | None:
        """The next reply, in the order the requests were sent, or ``None`` for now."""
        return self._replies.popleft() if self._replies else None

    def close(self) -> list[int]:
        """Stop; return fds received and never handed out (the caller closes them)."""
        self.state = SessionState.CLOSED
        leftover = self.reader.close()
        for reply in self._replies:
            leftover.extend(reply.fds)
        self._replies.clear()
        self._pending.clear()
        return leftover


__all__ = ["FRONTEND_PROTOCOL_FEATURES", "FrontendSession", "Reply", "SessionState"]
