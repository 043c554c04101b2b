"""The sans-IO frontend session: rules it enforces, replies it matches, and a whole handshake
with the sans-IO backend session (the two roles of the protocol talking with no socket)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvbus.devices.blk import BlkConfig, BlockDevice
from pvbus.vhost_user.backend import BACKEND_PROTOCOL_FEATURES, BackendSession
from pvbus.vhost_user.codec import MessageReader, encode
from pvbus.vhost_user.errors import LocalProtocolError, RemoteProtocolError
from pvbus.vhost_user.frontend import FrontendSession, SessionState
from pvbus.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    HEADER,
    U64,
    ConfigSpace,
    Empty,
    Flags,
    MemTable,
    Message,
    ProtocolFeature,
    Request,
    VringState,
)


def reply_bytes(request: Request, payload: U64 | VringState | ConfigSpace) -> bytes:
    data, _ = encode(Message(request, payload, Flags.VERSION | Flags.REPLY))
    return data


def negotiated(features: int = 1 << F_PROTOCOL_FEATURES, proto: int = 0) -> FrontendSession:
    """A session that has seen GET_FEATURES (and GET_PROTOCOL_FEATURES) replies."""
    s = FrontendSession()
    s.send(Request.GET_FEATURES)
    s.receive_data(reply_bytes(Request.GET_FEATURES, U64(features)))
    assert s.next_reply() is not None
    if features & (1 << F_PROTOCOL_FEATURES):
        s.send(Request.GET_PROTOCOL_FEATURES)
        s.receive_data(reply_bytes(Request.GET_PROTOCOL_FEATURES, U64(proto)))
        assert s.next_reply() is not None
        s.send(Request.SET_PROTOCOL_FEATURES, U64(proto))
    return s


def test_send_encodes_header_and_payload() -> None:
    s = FrontendSession()
    data, fds, expects = s.send(Request.GET_FEATURES)
    assert data == HEADER.pack(Request.GET_FEATURES, Flags.VERSION, 0)
    assert fds == ()
    assert expects and s.awaiting == 1


def test_reply_fed_one_byte_at_a_time() -> None:
    s = FrontendSession()
    s.send(Request.GET_FEATURES)
    for b in reply_bytes(Request.GET_FEATURES, U64(0x1234)):
        assert s.next_reply() is None
        s.receive_data(bytes([b]))
    reply = s.next_reply()
    assert reply is not None and reply.payload == U64(0x1234) and reply.ok
    assert s.backend_features == 0x1234
    assert s.awaiting == 0


def test_replies_matched_in_order() -> None:
    s = negotiated(proto=1 << ProtocolFeature.CONFIG)
    s.send(Request.GET_FEATURES)
    s.send(Request.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)))
    both = reply_bytes(Request.GET_FEATURES, U64(7)) + reply_bytes(
        Request.GET_CONFIG, ConfigSpace(0, 4, 0, b"abcd")
    )
    s.receive_data(both)
    first, second = s.next_reply(), s.next_reply()
    assert first is not None and first.request is Request.GET_FEATURES
    assert second is not None and second.payload == ConfigSpace(0, 4, 0, b"abcd")


def test_reply_out_of_order_is_remote_error() -> None:
    s = negotiated(proto=1 << ProtocolFeature.CONFIG)
    s.send(Request.GET_FEATURES)
    s.send(Request.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)))
    with pytest.raises(RemoteProtocolError, match="awaiting GET_FEATURES"):
        s.receive_data(reply_bytes(Request.GET_CONFIG, ConfigSpace(0, 4, 0, b"abcd")))
    assert s.state is SessionState.ERROR
    with pytest.raises(LocalProtocolError):
        s.send(Request.GET_FEATURES)


def test_unasked_reply_is_remote_error() -> None:
    s = FrontendSession()
    with pytest.raises(RemoteProtocolError, match="unexpected reply"):
        s.receive_data(reply_bytes(Request.GET_FEATURES, U64(1)))


def test_request_from_backend_is_remote_error() -> None:
    s = FrontendSession()
    s.send(Request.GET_FEATURES)
    data, _ = encode(Message(Request.GET_FEATURES, Empty()))
    with pytest.raises(RemoteProtocolError):
        s.receive_data(data)


def test_hang_up_while_awaiting_is_remote_error() -> None:
    s = FrontendSession()
    s.send(Request.GET_FEATURES)
    with pytest.raises(RemoteProtocolError, match="closed the connection awaiting GET_FEATURES"):
        s.receive_data(b"")


def test_need_reply_only_with_reply_ack() -> None:
    without = negotiated(proto=0)
    data, _, expects = without.send(Request.SET_OWNER, need_reply=True)
    assert not expects and HEADER.unpack_from(data)[1] == Flags.VERSION
    with_ack = negotiated(proto=1 << ProtocolFeature.REPLY_ACK)
    data, _, expects = with_ack.send(Request.SET_OWNER, need_reply=True)
    assert expects and HEADER.unpack_from(data)[1] == Flags.VERSION | Flags.NEED_REPLY
    # A request with its own reply never carries NEED_REPLY.
    data, _, _ = with_ack.send(Request.GET_FEATURES, need_reply=True)
    assert HEADER.unpack_from(data)[1] == Flags.VERSION


def test_failing_ack_is_reported() -> None:
    s = negotiated(proto=1 << ProtocolFeature.REPLY_ACK)
    s.send(Request.SET_OWNER, need_reply=True)
    s.receive_data(reply_bytes(Request.SET_OWNER, U64(1)))
    reply = s.next_reply()
    assert reply is not None and reply.is_ack and not reply.ok


@pytest.mark.parametrize(
    ("request_", "payload", "needs"),
    [
        (Request.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4)), "CONFIG"),
        (Request.SET_CONFIG, ConfigSpace(0, 1, 0, b"x"), "CONFIG"),
        (Request.GET_QUEUE_NUM, None, "MQ"),
        (Request.RESET_DEVICE, None, "RESET_DEVICE"),
        (Request.GET_STATUS, None, "STATUS"),
        (Request.GET_MAX_MEM_SLOTS, None, "CONFIGURE_MEM_SLOTS"),
    ],
)
def test_requests_need_their_protocol_feature(
    request_: Request, payload: ConfigSpace | None, needs: str
) -> None:
    s = negotiated(proto=0)
    with pytest.raises(LocalProtocolError, match=needs):
        s.send(request_, payload)


def test_protocol_features_need_the_backend_bit() -> None:
    s = negotiated(features=1 << 32)
    with pytest.raises(LocalProtocolError, match="VHOST_USER_F_PROTOCOL_FEATURES"):
        s.send(Request.GET_PROTOCOL_FEATURES)


def test_unoffered_bits_refused() -> None:
    s = negotiated(proto=1 << ProtocolFeature.MQ)
    with pytest.raises(LocalProtocolError, match="unoffered"):
        s.send(Request.SET_FEATURES, U64(1 << 33))
    with pytest.raises(LocalProtocolError, match="unoffered"):
        s.send(Request.SET_PROTOCOL_FEATURES, U64(1 << ProtocolFeature.CONFIG))


def test_set_features_before_get_features_refused() -> None:
    with pytest.raises(LocalProtocolError, match="before GET_FEATURES"):
        FrontendSession().send(Request.SET_FEATURES, U64(0))


def test_vring_enable_needs_protocol_features_acked() -> None:
    s = negotiated()
    with pytest.raises(LocalProtocolError, match="SET_VRING_ENABLE"):
        s.send(Request.SET_VRING_ENABLE, VringState(0, 1))
    s.send(Request.SET_FEATURES, U64(1 << F_PROTOCOL_FEATURES))
    s.send(Request.SET_VRING_ENABLE, VringState(0, 1))


def test_wrong_payload_kind_and_fd_count_refused() -> None:
    s = FrontendSession()
    with pytest.raises(LocalProtocolError, match="carries"):
        s.send(Request.SET_VRING_NUM, U64(1))
    with pytest.raises(LocalProtocolError, match="fds"):
        s.send(Request.SET_VRING_KICK, U64(0))  # needs its fd
    with pytest.raises(LocalProtocolError, match="fds"):
        s.send(Request.SET_MEM_TABLE, MemTable(()), (3,))


# -- both roles, no socket -------------------------------------------------------------------


class _Listener:
    def __init__(self) -> None:
        self.started: list[int] = []

    def ring_started(self, index: int, kick_fd: int | None) -> None:
        self.started.append(index)

    def ring_stopped(self, index: int) -> None:
        pass


def _exchange(
    front: FrontendSession, back: BackendSession, request: Request, *args: object
) -> None:
    data, fds, _ = front.send(request, *args)  # type: ignore[arg-type]
    reader = MessageReader("backend")
    reader.receive_data(data, [os.dup(fd) for fd in fds])
    msg = reader.next_message()
    assert msg is not None
    reply = back.handle(msg)
    if reply is not None:
        front.receive_data(encode(reply)[0])


@pytest.mark.parametrize("offered", [BACKEND_PROTOCOL_FEATURES, 0])
def test_handshake_with_backend_session(tmp_path: Path, offered: int) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = BlockDevice(BlkConfig(str(image)))
    back = BackendSession(device, _Listener(), protocol_features=offered)
    front = FrontendSession()
    try:
        _exchange(front, back, Request.SET_OWNER)
        _exchange(front, back, Request.GET_FEATURES)
        assert front.backend_features == back.offered_features()
        _exchange(front, back, Request.GET_PROTOCOL_FEATURES)
        assert front.backend_protocol_features == offered
        wanted = offered & (1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.CONFIG)
        _exchange(front, back, Request.SET_PROTOCOL_FEATURES, U64(wanted))
        assert back.protocol_features == wanted
        _exchange(front, back, Request.SET_FEATURES, U64(1 << 32 | 1 << F_PROTOCOL_FEATURES))
        assert back.features == front.features
        if offered:
            _exchange(front, back, Request.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)))
            reply = front.next_reply()
            while reply is not None and reply.request is not Request.GET_CONFIG:
                reply = front.next_reply()
            assert reply is not None and isinstance(reply.payload, ConfigSpace)
            assert int.from_bytes(reply.payload.data, "little") == (1 << 20) // 512
        else:
            with pytest.raises(LocalProtocolError):
                front.send(Request.GET_CONFIG, ConfigSpace(0, 8, 0, bytes(8)))
        assert front.awaiting == 0
    finally:
        back.close()
        device.close()
