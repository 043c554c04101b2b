"""virtio-net (VIRTIO 1.2 section 5.1) over packed rings (section 2.8).

The net device's scenarios of tests/test_net_device.py run again with packed mock queues
(their ``Rig`` built with ``packed=True``), except those that look inside a split ring; then
what only a packed ring does differently: merged receive buffers taken, given back and asked for
again (``PackedQueue.unpop``, ``want_more``) and rings going round many times.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import test_net_device as net
from pvbus.devices.net import NetConfig
from pvbus.devices.net.frames import HDR_LEN, NET_HDR
from pvbus.virtio.packed import PackedQueue
from test_net_device import MAC, PEER, Rig, frame


@pytest.fixture
def packed_rigs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``Rig`` the net device tests build has packed rings."""
    monkeypatch.setattr(net, "Rig", functools.partial(Rig, packed=True))


@pytest.fixture
def prig() -> Iterator[Rig]:
    r = Rig(NetConfig(mac=MAC), packed=True)
    assert all(isinstance(q, PackedQueue) for q in r.dev.queues)
    yield r
    r.close()


#: Scenarios of test_net_device.py that take a ``rig`` and nothing of a split ring's insides.
WITH_RIG: list[Callable[[Rig], None]] = [
    net.test_link_up_with_backend,
    net.test_transmit_header_split_across_buffers,
    net.test_receive_into_buffers,
    net.test_rx_with_readable_chain_is_completed_empty,
    net.test_transmit_with_bad_address_is_counted,
    net.test_rx_filter_via_control_queue,
    net.test_mac_addr_set,
    net.test_control_without_ack_room_is_a_queue_error,
    net.test_reset_restores_filter_and_stops_reading,
    net.test_backend_gone_means_link_down,
    net.test_malformed_frames_in_a_fast_path_burst_are_counted_and_completed,
    net.test_too_big_frame_in_one_buffer_is_a_tx_error,
    net.test_backend_gone_mid_burst_drops_the_rest,
    net.test_malformed_receive_chain_mid_burst,
    net.test_receive_chains_of_several_buffers,
    net.test_receive_buffer_outside_guest_memory,
]

#: Scenarios that build their own ``Rig`` (packed through ``packed_rigs``), with arguments.
STANDALONE: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
    (net.test_transmit_reaches_backend, (False,)),
    (net.test_transmit_reaches_backend, (True,)),
    (net.test_receive_without_mrg_rxbuf_needs_big_buffers, ()),
    (net.test_legacy_header_without_version_1, ()),
    (net.test_backpressure_keeps_frames_until_buffers_arrive, (False,)),
    (net.test_backpressure_keeps_frames_until_buffers_arrive, (True,)),
    (net.test_rx_extra_needs_its_feature, ()),
    (net.test_multiqueue_steers_flows_back_to_their_pair, ()),
    (net.test_legacy_header_fast_path, ()),
    (net.test_loopback_takes_a_burst_in_ring_order_and_drops_what_does_not_fit, ()),
    (net.test_receive_burst_falls_back_in_order, ()),
    (net.test_receive_burst_with_filter_and_no_room, ()),
    (net.test_loopback_fills_whole_buffers_then_merges_in_order, ()),
    (net.test_loopback_keeps_batches_in_order_up_to_its_limit, ()),
    (net.test_loopback_frames_wait_in_the_backend_until_buffers_come, ()),
]


@pytest.mark.parametrize("scenario", WITH_RIG, ids=lambda f: f.__name__[5:])
def test_net_scenario_on_packed_rings(scenario: Callable[[Rig], None], prig: Rig) -> None:
    scenario(prig)


@pytest.mark.parametrize(
    ("scenario", "args"),
    STANDALONE,
    ids=[f"{f.__name__[5:]}{list(a) if a else ''}" for f, a in STANDALONE],
)
def test_net_standalone_scenario_on_packed_rings(
    scenario: Callable[..., None], args: tuple[Any, ...], packed_rigs: None
) -> None:
    scenario(*args)


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_merged_buffers_wait_for_enough_room_then_arrive_together(
    packed: bool, event_idx: bool
) -> None:
    """A frame that needs three buffers with two posted: the device takes them, gives them
    back and asks for a kick beyond them; a third buffer brings the whole frame, its
    num_buffers 3, in ring order (5.1.6.4). Then more of the same, round the ring."""
    rig = Rig(NetConfig(mac=MAC), event_idx=event_idx, queue_size=8, packed=packed)
    try:
        for round_ in range(6):
            big = frame(MAC, PEER, bytes([round_]) * 1200)  # header + 1214 bytes: 3 of 500
            rig.post_rx([500, 500])
            rig.peer.send(big)
            rig.reactor.fire()
            assert rig.received() == []  # not enough room: nothing returned
            assert rig.dev.stats.rx_frames == round_
            rig.post_rx([500])
            rig.dev.process(0)  # the driver's kick
            got = rig.received()
            assert len(got) == 1
            header, data = got[0]
            assert data == big and NET_HDR.unpack(header)[6] == 3
            assert rig.dev.stats.rx_frames == round_ + 1
        queue = rig.dev.queues[0]
        if isinstance(queue, PackedQueue):
            # 18 one-descriptor chains through a ring of 8: two laps and 2 descriptors.
            assert (
                (queue.avail_pos, queue.avail_wrap) == (queue.used_pos, queue.used_wrap) == (2, 1)
            )
            assert queue.next_used == 18
    finally:
        rig.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_transmit_and_receive_many_laps_of_a_small_ring(packed: bool) -> None:
    rig = Rig(NetConfig(mac=MAC), queue_size=4, packed=packed)
    try:
        sent = [frame(PEER, MAC, i.to_bytes(2, "big") * 30) for i in range(40)]
        for f in sent:
            rig.q[1].send([bytes(HDR_LEN) + f])
            rig.dev.process(1)
            assert len(rig.q[1].get_used()) == 1
        assert rig.peer_frames() == sent
        back = [frame(MAC, PEER, i.to_bytes(2, "big") * 25) for i in range(40)]
        got: list[bytes] = []
        for f in back:
            rig.post_rx([256])
            rig.peer.send(f)
            rig.reactor.fire()
            got += [data for _, data in rig.received()]
        assert got == back
        assert rig.dev.stats.rx_frames == rig.dev.stats.tx_frames == 40
    finally:
        rig.close()
