"""GroupBuffer alone (no gRPC, no Ray): exactly-once, staleness at put and at take, backpressure, state_dict."""

import threading
import time

import msgpack
import numpy as np
import pytest

from learner.buffer import GroupBuffer, oldest_version
from protos import learner_pb2 as pb
from protos.testing import random_group


def group(versions=(0, 0), **kw):
    return random_group(group_size=3, versions=versions, **kw)


def test_accept_then_take_counts_failed_trajectories():
    buf = GroupBuffer(4, 2)
    g = group(failed=1)
    ack = buf.put(g, current_version=0)
    assert ack.kind == pb.ACCEPTED and ack.code == 0 and len(buf) == 1
    assert buf.get_batch(1, 0, timeout=0) == [g]
    c = buf.stats()["counters"]
    assert c["accepted"] == 1 and c["taken"] == 1 and c["failed_trajectories"] == 1 and c["trajectories_accepted"] == 3


def test_duplicate_is_counted_once_and_reused_id_rejected():
    buf = GroupBuffer(4, 2)
    g = group()
    assert buf.put(g, 0).kind == pb.ACCEPTED
    dup = buf.put(g, 0)
    assert dup.kind == pb.DUPLICATE and dup.code == 6
    other = group(group_id=g.group_id)  # same id, different episodes
    assert buf.put(other, 0).reason == "group_id_reused"
    assert len(buf) == 1 and buf.stats()["counters"]["accepted"] == 1 and buf.stats()["counters"]["duplicate"] == 1


def test_concurrent_resubmission_accepts_exactly_once():
    buf = GroupBuffer(4, 2)
    g = group()
    acks = []
    threads = [threading.Thread(target=lambda: acks.append(buf.put(g, 0).kind)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(acks) == [pb.ACCEPTED] + [pb.DUPLICATE] * 7 and len(buf) == 1


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_stale_at_put(max_staleness):
    buf = GroupBuffer(4, max_staleness)
    v = 5
    fresh, stale = group(versions=(v - max_staleness, v)), group(versions=(v - max_staleness - 1, v))
    assert buf.put(fresh, v).kind == pb.ACCEPTED
    ack = buf.put(stale, v)
    assert ack.kind == pb.STALE and ack.code == 9 and "behind" in ack.detail
    assert buf.stats()["counters"]["stale_at_put"] == 1 and len(buf) == 1


def test_stale_at_take_dropped_and_histogram():
    buf = GroupBuffer(8, 2)
    old, mid, new = group(versions=(3, 4)), group(versions=(4, 4)), group(versions=(5, 5))
    for g in (old, mid, new):
        assert buf.put(g, 5).kind == pb.ACCEPTED
    assert oldest_version(old) == 3
    # The learner moved to version 6 while they waited: `old` (3) is now 3 behind.
    assert buf.get_batch(2, 6, timeout=0) == [mid, new]
    s = buf.stats()
    assert s["counters"]["stale_at_take"] == 1 and s["staleness"] == {2: 1, 1: 1} and s["size"] == 0


def test_get_batch_waits_all_or_nothing():
    buf = GroupBuffer(4, 2)
    buf.put(group(), 0)
    t0 = time.monotonic()
    assert buf.get_batch(2, 0, timeout=0.2) == [] and time.monotonic() - t0 >= 0.2
    assert len(buf) == 1  # nothing taken
    with pytest.raises(ValueError):
        buf.get_batch(5, 0)


def test_full_buffer_blocks_then_retry_later_nothing_dropped():
    buf = GroupBuffer(2, 2, retry_after_s=0.7)
    for _ in range(2):
        buf.put(group(), 0)
    late = group()
    ack = buf.put(late, 0, timeout=0.1)
    assert ack.kind == pb.RETRY_LATER and ack.retry_after_s == 0.7 and len(buf) == 2
    # A blocked put completes as soon as a batch is taken.
    result = []
    th = threading.Thread(target=lambda: result.append(buf.put(late, 0, timeout=10)))
    th.start()
    time.sleep(0.2)
    assert th.is_alive()
    first = buf.get_batch(1, 0, timeout=0)
    th.join(5)
    assert not th.is_alive() and result[0].kind == pb.ACCEPTED
    rest = buf.get_batch(2, 0, timeout=0)
    assert late in rest and first[0] not in rest and buf.stats()["counters"]["accepted"] == 3


def test_close_wakes_waiters():
    buf = GroupBuffer(1, 2)
    buf.put(group(), 0)
    out = []
    th = threading.Thread(target=lambda: out.append(buf.put(group(), 0, timeout=30)))
    th.start()
    time.sleep(0.1)
    buf.close()
    th.join(5)
    assert out[0].kind == pb.RETRY_LATER


def test_state_dict_round_trip_keeps_seen_set_and_waiting_groups():
    buf = GroupBuffer(4, 2)
    taken, waiting = group(), group(versions=(1, 2))
    buf.put(taken, 2)
    buf.get_batch(1, 2)
    buf.put(waiting, 2)
    buf.count_rejection("dtype")
    state = msgpack.unpackb(msgpack.packb(buf.state_dict()), raw=False)  # plain types: any checkpoint format holds it
    new = GroupBuffer(4, 2)
    new.load_state_dict(state)
    assert new.put(taken, 2).kind == pb.DUPLICATE and new.put(waiting, 2).kind == pb.DUPLICATE
    (back,) = new.get_batch(1, 2, timeout=0)
    assert back.group_id == waiting.group_id
    assert np.array_equal(back.trajectories[0].token_ids, waiting.trajectories[0].token_ids)
    s = new.stats()
    assert s["counters"]["accepted"] == 2 and s["counters"]["duplicate"] == 2 and s["rejected"] == {"dtype": 1}
    assert s["staleness"] == {2: 1, 1: 1}


def test_dedup_window_forgets_oldest():
    buf = GroupBuffer(8, 2, dedup_window=2)
    gs = [group() for _ in range(3)]
    for g in gs:
        buf.put(g, 0)
    buf.get_batch(3, 0)
    assert buf.put(gs[2], 0).kind == pb.DUPLICATE
    assert buf.put(gs[0], 0).kind == pb.ACCEPTED  # fell out of the window
