"""The two error families of the vhost-user layer (after h11): ours and the peer's."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class for vhost-user protocol errors."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order; the connection must be closed.

    ``fds`` are the descriptors that came with the refused message, for the caller to close.
    """

    def __init__(self, message: str, fds: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.fds = fds
