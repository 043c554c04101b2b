"""pvbus.virtio.buffers: headers split across descriptors."""

from __future__ import annotations

import pytest

from pvbus.testing import FakeGuest
from pvbus.virtio.buffers import gather, skip
from pvbus.virtio.errors import GuestMemoryError


def test_gather_and_skip_across_buffers() -> None:
    guest = FakeGuest()
    a, b, c = guest.put(b"abc"), guest.put(b"defgh"), guest.put(b"ij")
    bufs = [(a, 3), (b, 5), (c, 2)]
    assert gather(bufs, 6, guest.mem) == b"abcdef"
    assert gather(bufs, 10, guest.mem) == b"abcdefghij"
    assert gather(bufs, 11, guest.mem) is None  # they hold fewer
    assert gather(bufs, 0, guest.mem) == b""
    assert skip(bufs, 4) == [(b + 1, 4), (c, 2)]
    assert skip(bufs, 3) == [(b, 5), (c, 2)]
    assert skip(bufs, 10) == []


def test_gather_outside_guest_memory_raises() -> None:
    guest = FakeGuest()
    with pytest.raises(GuestMemoryError):
        gather([(guest.put(b"ab"), 2), (1 << 40, 8)], 6, guest.mem)
