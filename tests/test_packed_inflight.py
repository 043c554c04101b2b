"""Inflight tracking for packed virtqueues (vhost-user.rst "Inflight I/O tracking",
QueueRegionPacked): a backend that dies anywhere leaves a region from which its successor
resubmits exactly the requests not yet returned, and finds where both sides of the ring stand."""

from __future__ import annotations

import struct

import pytest

from pvbus.testing import FakeGuest, MockPackedDriverQueue
from pvbus.virtio.errors import QueueError
from pvbus.virtio.inflight import PackedInflight, packed_region_size
from pvbus.virtio.packed import PackedQueue, encode_base

SIZE = 8


def region(size: int = SIZE) -> bytearray:
    return bytearray(packed_region_size(size))


def twin(mock: MockPackedDriverQueue) -> PackedQueue:
    """A new device-side queue on the same rings: what a restarted backend builds."""
    old = mock.device_queue
    queue = PackedQueue(max_size=old.max_size)
    queue.size = old.size
    queue.desc_addr, queue.avail_addr, queue.used_addr = (
        old.desc_addr,
        old.avail_addr,
        old.used_addr,
    )
    queue.set_base(0x8000_8000)  # what a frontend that lost the real base sends
    return queue


def tracked(size: int = SIZE) -> tuple[FakeGuest, MockPackedDriverQueue, bytearray]:
    guest = FakeGuest(1 << 18)
    mock = MockPackedDriverQueue(guest, size)
    area = region(size)
    assert mock.device_queue.attach_inflight(guest.mem, PackedInflight(memoryview(area), size)) == 0
    return guest, mock, area


def contents(guest: FakeGuest, queue: PackedQueue) -> list[tuple[int, list[bytes], list[int]]]:
    out = []
    while (chain := queue.pop(guest.mem)) is not None:
        out.append(
            (
                chain.head,
                [guest.read(a, n) for a, n in chain.readable],
                [n for _, n in chain.writable],
            )
        )
    return out


def test_region_size_is_aligned_and_holds_every_descriptor() -> None:
    for n in (1, 2, 7, 128, 256, 1024, 32768):
        size = packed_region_size(n)
        assert size % 64 == 0
        assert size >= 32 + 32 * n  # header (29 bytes, entries 8-aligned) and DescStatePacked


def test_fresh_region_is_initialised_with_the_used_side_and_a_free_list() -> None:
    area = region()
    inflight = PackedInflight(memoryview(area), SIZE)
    ring16 = memoryview(bytearray(16 * SIZE)).cast("H")
    assert inflight.recover(ring16, SIZE, 3, 0) is None
    version, desc_num, free, old_free, used, old_used = struct.unpack_from("<6H", area, 8)
    assert (version, desc_num, free, old_free, used, old_used) == (1, SIZE, 0, 0, 3, 3)
    assert area[20:22] == b"\0\0"  # wrap counters
    nexts = [struct.unpack_from("<H", area, 32 + 32 * i + 2)[0] for i in range(SIZE)]
    assert nexts == list(range(1, SIZE + 1))


def test_restart_resubmits_the_unfinished_chains_in_order_from_the_regions_copies() -> None:
    """Three chains taken (a list, an indirect one, a single), the third completed first: its
    used descriptor overwrites the first chain's head in the ring. The successor rebuilds the
    first two from the region, oldest first, and takes new chains after them."""
    guest, mock, area = tracked()
    queue = mock.device_queue
    a = mock.send([b"a1", b"a2"], [3])
    b = mock.send([b"b1", b"b2"], [2], indirect=True)
    c = mock.send([b"c"], [1])
    taken = [queue.pop(guest.mem) for _ in range(3)]
    assert [t.head for t in taken if t] == [a, b, c]
    d = mock.send([b"d"], [1])  # available, never taken
    queue.add_used(guest.mem, c, 1)  # out of order: over a's head in the ring
    assert queue.inflight is not None and queue.inflight.in_flight() == sorted([a, b])
    # The backend dies here. Its successor maps the same region and the same rings.
    successor = twin(mock)
    resumed = successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE))
    assert resumed == 2
    # The used side resumed after c's used descriptor (two descriptors skipped), the
    # available side after a and b, where d is.
    assert (successor.used_pos, successor.used_wrap) == (2, 1)
    assert (successor.avail_pos, successor.avail_wrap) == (6, 1)
    again = contents(guest, successor)
    assert again == [
        (a, [b"a1", b"a2"], [3]),
        (b, [b"b1", b"b2"], [2]),
        (d, [b"d"], [1]),
    ]
    for bid, _, _ in again:
        successor.add_used(guest.mem, bid, 1)
    done = [bid for bid, _, _ in mock.receive()]
    assert sorted(done) == sorted([a, b, c, d])  # every request completed exactly once
    assert mock.num_free == SIZE
    e = mock.send([b"e"] * 3, [1])
    assert contents(guest, successor) == [(e, [b"e"] * 3, [1])]


def test_published_batch_whose_marks_were_not_cleared_is_committed() -> None:
    """The backend died after the used descriptors reached the ring, before the region
    committed: those are done, not resubmitted."""
    guest, mock, area = tracked()
    queue = mock.device_queue
    ids = [mock.send([b"x"], [1]) for _ in range(3)]
    contents(guest, queue)
    inflight = queue.inflight
    assert inflight is not None
    heads = inflight.pre_put(ids[:2])
    inflight.set_used(4, 1)
    queue._write_used([(ids[0], 1), (ids[1], 1)])  # published; post_put never runs
    del heads
    successor = twin(mock)
    assert successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE)) == 1
    assert contents(guest, successor) == [(ids[2], [b"x"], [1])]
    assert (successor.used_pos, successor.avail_pos) == (4, 6)


def test_unpublished_batch_is_rolled_back_and_resubmitted() -> None:
    """The backend died after recording a batch in the region, before the ring showed it."""
    guest, mock, area = tracked()
    queue = mock.device_queue
    ids = [mock.send([b"x"], [1]) for _ in range(3)]
    contents(guest, queue)
    inflight = queue.inflight
    assert inflight is not None
    inflight.pre_put(ids[:2])
    inflight.set_used(4, 1)  # the ring was never written
    successor = twin(mock)
    assert successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE)) == 3
    assert [c[0] for c in contents(guest, successor)] == ids
    assert successor.used_pos == 0


def test_chain_half_recorded_when_taken_is_taken_again_from_the_ring() -> None:
    guest, mock, area = tracked()
    queue = mock.device_queue
    first = mock.send([b"first"])
    second = mock.send([b"s1", b"s2", b"s3"])
    chain = queue.pop(guest.mem)
    assert chain is not None and chain.head == first
    inflight = queue.inflight
    assert inflight is not None
    words = memoryview(area).cast("H")
    committed = words[7]  # old_free_head
    inflight.begin(queue._ring, 1, 2, SIZE)  # the second chain's first two descriptors...
    words[7] = committed  # ...and the backend died before it recorded the last one
    successor = twin(mock)
    assert successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE)) == 1
    assert [c[0] for c in contents(guest, successor)] == [first, second]


def test_unpop_forgets_what_it_gives_back() -> None:
    guest, mock, area = tracked()
    queue = mock.device_queue
    ids = [mock.send([b"x"] * n) for n in (2, 1, 3)]
    contents(guest, queue)
    queue.unpop(2)
    assert queue.inflight is not None and queue.inflight.in_flight() == [ids[0]]
    successor = twin(mock)
    assert successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE)) == 1
    assert [c[0] for c in contents(guest, successor)] == ids


def test_threads_completing_while_chains_are_taken_keep_the_region_consistent() -> None:
    """Completions from I/O threads interleave with new chains (virtio-blk does that): many
    rounds later the region still resubmits exactly what is in flight."""
    import threading

    guest, mock, area = tracked(64)
    queue = mock.device_queue
    lock = threading.Lock()
    done: list[int] = []
    for round_ in range(20):
        ids = [mock.send([bytes([round_])] * (1 + i % 3), [1]) for i in range(12)]
        chains = contents(guest, queue)
        assert [c[0] for c in chains] == ids

        def complete(part: list[int]) -> None:
            for bid in part:
                with lock:
                    queue.add_used(guest.mem, bid, 1)

        workers = [threading.Thread(target=complete, args=(ids[k::3],)) for k in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        done += [bid for bid, _, _ in mock.receive()]
    assert len(done) == 240 and mock.num_free == 64
    keep = [mock.send([b"k"], [1]) for _ in range(4)]
    contents(guest, queue)
    successor = twin(mock)
    assert successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), 64)) == 4
    assert [c[0] for c in contents(guest, successor)] == keep


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (8, 2, "version 2"),
        (10, SIZE + 1, "for 9 descriptors"),
        (18, SIZE + 5, "used position"),
    ],
)
def test_corrupt_regions_are_queue_errors(offset: int, value: int, match: str) -> None:
    guest, mock, area = tracked()
    mock.send([b"x"])
    contents(guest, mock.device_queue)
    struct.pack_into("<H", area, offset, value)
    with pytest.raises(QueueError, match=match):
        twin(mock).attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE))


def test_free_list_loop_is_a_queue_error() -> None:
    guest, mock, area = tracked()
    struct.pack_into("<H", area, 32 + 2, 0)  # entry 0's next: itself
    with pytest.raises(QueueError, match="loops"):
        twin(mock).attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE))


def test_region_for_a_smaller_queue_is_refused() -> None:
    guest = FakeGuest()
    mock = MockPackedDriverQueue(guest, SIZE)
    with pytest.raises(QueueError):
        mock.device_queue.attach_inflight(guest.mem, PackedInflight(memoryview(region(4)), 4))
    with pytest.raises(QueueError):
        PackedInflight(memoryview(bytearray(64)), SIZE)


def test_vring_base_after_restart_is_the_regions_not_the_frontends() -> None:
    guest, mock, area = tracked()
    queue = mock.device_queue
    ids = [mock.send([b"x"]) for _ in range(3)]
    contents(guest, queue)
    queue.add_used(guest.mem, ids[0], 0)
    successor = twin(mock)
    successor.set_base(encode_base(0, 1, 0, 1))
    successor.attach_inflight(guest.mem, PackedInflight(memoryview(area), SIZE))
    assert successor.vring_base() == encode_base(3, 1, 1, 1)
