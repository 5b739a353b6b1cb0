"""The learner service over real gRPC on 127.0.0.1 (no mocks): admission, validation, auth,
exactly-once, staleness, backpressure, weight streaming and reconnection across a restart."""

import dataclasses
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from actors.learner_client import LearnerClient, LearnerUnavailable, ack_code
from configs.schema import LearnerConfig
from learner.server import LearnerServer, TrainerHooks
from protos import learner_pb2 as pb
from protos import learner_pb2_grpc as pb_grpc
from protos.codec import dumps
from protos.testing import malformed_payloads, random_group

G, VOCAB, IMG = 4, 1000, 7
CFG = LearnerConfig(group_size=G, vocab_size=VOCAB, image_token_id=IMG, buffer_capacity=8, max_staleness=2,
                    weight_bucket_bytes=4096, submit_block_s=10.0, stop_grace_s=0.0,
                    backoff_initial_s=0.02, backoff_max_s=0.2, retry_deadline_s=20.0)
BAD_KINDS = [m.name for m in malformed_payloads(np.random.default_rng(0), group_size=G, vocab_size=VOCAB,
                                                image_token_id=IMG)]


def good(versions=(0, 0), **kw):
    return random_group(group_size=G, vocab_size=VOCAB, image_token_id=IMG, versions=versions, media=2, **kw)


@pytest.fixture
def make_server():
    servers = []

    def make(**overrides):
        s = LearnerServer(dataclasses.replace(CFG, **overrides)).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop(0)


def client(server, **kw):
    return LearnerClient(server.address, server.cfg.token, backoff_initial_s=CFG.backoff_initial_s,
                         backoff_max_s=CFG.backoff_max_s, retry_deadline_s=CFG.retry_deadline_s, **kw)


def raw_submit(server, msgs, metadata=(), max_bytes=None):
    opts = [("grpc.max_send_message_length", max_bytes)] if max_bytes else []
    with grpc.insecure_channel(server.address, options=opts) as ch:
        return pb_grpc.LearnerServiceStub(ch).SubmitGroups(iter(msgs), metadata=metadata, timeout=10)


def test_good_group_reaches_the_buffer(make_server):
    server = make_server()
    g = good(failed=1)
    with client(server) as c:
        (ack,) = c.submit([g])
        assert ack.kind == pb.ACCEPTED and ack_code(ack) == grpc.StatusCode.OK and ack.group_id == g.group_id
        (got,) = server.get_batch(1, timeout=5)
        assert got.group_id == g.group_id and [t.traj_id for t in got.trajectories] == [t.traj_id for t in g.trajectories]
        assert np.array_equal(got.trajectories[0].behavior_logprobs, g.trajectories[0].behavior_logprobs)
        st = c.status()
        assert st.counters["accepted"] == 1 and st.counters["failed_trajectories"] == 1 and st.buffer_size == 0


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_message_is_rejected_and_the_learner_serves_on(make_server, kind):
    server = make_server()
    (bad,) = [m for m in malformed_payloads(group_size=G, vocab_size=VOCAB, image_token_id=IMG) if m.name == kind]
    ok1, ok2 = good(), good()
    # One stream: good, bad, good. The bad one is answered on its own; its neighbours are taken.
    reply = raw_submit(server, [pb.GroupMessage(group_id=ok1.group_id, payload=dumps(ok1)),
                                pb.GroupMessage(group_id=bad.group_id, payload=bad.payload),
                                pb.GroupMessage(group_id=ok2.group_id, payload=dumps(ok2))])
    kinds = [a.kind for a in reply.acks]
    assert kinds == [pb.ACCEPTED, pb.REJECTED, pb.ACCEPTED], reply
    rejected = reply.acks[1]
    assert ack_code(rejected) == grpc.StatusCode.INVALID_ARGUMENT and rejected.reason == bad.reason, rejected
    assert rejected.group_id == bad.group_id and rejected.detail
    with client(server) as c:
        st = c.status()
        assert st.rejected[bad.reason] == 1 and st.counters["rejected"] == 1 and st.counters["accepted"] == 2
        assert c.submit([good()])[0].kind == pb.ACCEPTED  # still serving
    assert len(server.get_batch(3, timeout=5)) == 3


def test_oversized_message_is_refused_and_the_learner_serves_on(make_server):
    server = make_server(max_message_bytes=2**20, weight_bucket_bytes=2**19)
    big = random_group(group_size=G, num_tokens=40_000, vocab_size=VOCAB)  # ~1.6 MB
    with pytest.raises(grpc.RpcError) as e:
        raw_submit(server, [pb.GroupMessage(group_id=big.group_id, payload=dumps(big))], max_bytes=2**24)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with client(server, max_message_bytes=2**20) as c:
        with pytest.raises(ValueError, match="max_message_bytes"):
            c.submit([big])  # the client refuses before sending
        assert c.submit([good()])[0].kind == pb.ACCEPTED


def test_token_is_required(make_server):
    server = make_server(token="s3cret")
    g = good()
    for metadata in [(), (("authorization", "Bearer wrong"),), (("x-weft-token", "s3cre"),), (("authorization", "s3cret"),)]:
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.LearnerServiceStub(ch)
            calls = [lambda: stub.SubmitGroups(iter([pb.GroupMessage(group_id=g.group_id, payload=dumps(g))]),
                                               metadata=metadata, timeout=5),
                     lambda: stub.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=5),
                     lambda: next(stub.WatchWeights(pb.WatchRequest(from_version=-1), metadata=metadata, timeout=5))]
            for call in calls:
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert len(server.buffer) == 0
    with LearnerClient(server.address, token="nope") as c, pytest.raises(grpc.RpcError) as e:
        c.submit([g])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = raw_submit(server, [pb.GroupMessage(group_id=g.group_id, payload=dumps(g))], metadata=(("x-weft-token", "s3cret"),))
    assert reply.acks[0].kind == pb.ACCEPTED
    with client(server) as c:  # Bearer
        assert c.submit([good()])[0].kind == pb.ACCEPTED and c.status().counters["accepted"] == 2


def test_duplicate_is_counted_once(make_server):
    server = make_server()
    g = good()
    with client(server) as c:
        acks = c.submit([g, g])
        assert [a.kind for a in acks] == [pb.ACCEPTED, pb.DUPLICATE]
        assert ack_code(acks[1]) == grpc.StatusCode.ALREADY_EXISTS
        assert c.submit([g])[0].kind == pb.DUPLICATE
        st = c.status()
    assert st.counters["accepted"] == 1 and st.counters["duplicate"] == 2 and len(server.buffer) == 1


def test_stale_group_is_dropped_and_counted(make_server):
    server = make_server(max_staleness=2)
    server.publish(5, {})
    with client(server) as c:
        stale, fresh = good(versions=(2, 5)), good(versions=(3, 5))
        acks = c.submit([stale, fresh])
        assert [a.kind for a in acks] == [pb.STALE, pb.ACCEPTED]
        assert ack_code(acks[0]) == grpc.StatusCode.FAILED_PRECONDITION and acks[0].learner_version == 5
        server.publish(6, {})  # `fresh` (oldest token 3) is now 3 versions behind
        assert server.get_batch(1, timeout=0.3) == []
        st = c.status()
    assert st.counters["stale_at_put"] == 1 and st.counters["stale_at_take"] == 1 and st.buffer_size == 0


def test_full_buffer_slows_the_submitter_until_the_trainer_takes_a_batch(make_server):
    server = make_server(buffer_capacity=2, submit_block_s=10.0)
    first, later = [good(), good()], [good(), good()]
    with client(server) as c:
        assert [a.kind for a in c.submit(first)] == [pb.ACCEPTED] * 2
        out = []
        th = threading.Thread(target=lambda: out.extend(c.submit(later)))
        th.start()
        time.sleep(0.5)
        assert th.is_alive() and len(server.buffer) == 2  # blocked, not dropped
        assert [g.group_id for g in server.get_batch(2, timeout=5)] == [g.group_id for g in first]
        th.join(10)
        assert not th.is_alive() and [a.kind for a in out] == [pb.ACCEPTED] * 2
    assert [g.group_id for g in server.get_batch(2, timeout=5)] == [g.group_id for g in later]
    assert server.status().counters["retry_later"] == 0


def test_groups_are_admitted_while_the_stream_is_open_and_a_cut_stream_leaves_the_server_serving(make_server):
    server = make_server()
    first, later = good(), good()
    gate = threading.Event()

    def messages():
        yield pb.GroupMessage(group_id=first.group_id, payload=dumps(first))
        gate.wait(10)  # the stream stays open, then the client cuts it

    with grpc.insecure_channel(server.address) as ch:
        call = pb_grpc.LearnerServiceStub(ch).SubmitGroups.future(messages(), timeout=10)
        deadline = time.monotonic() + 10
        while len(server.buffer) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(server.buffer) == 1  # admitted as it arrived, not when the stream ended
        call.cancel()
        gate.set()
    with client(server) as c:
        assert [a.kind for a in c.submit([later, first])] == [pb.ACCEPTED, pb.DUPLICATE]
    assert [g.group_id for g in server.get_batch(2, timeout=5)] == [first.group_id, later.group_id]


def test_retry_later_hint_is_honoured_nothing_lost(make_server):
    server = make_server(buffer_capacity=1, submit_block_s=0.05, retry_after_s=0.1)
    a, b = good(), good()
    with client(server) as c:
        c.submit([a])
        out = []
        th = threading.Thread(target=lambda: out.extend(c.submit([b])))
        th.start()
        deadline = time.monotonic() + 10
        while server.status().counters["retry_later"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert th.is_alive() and server.status().counters["retry_later"] >= 2
        assert server.get_batch(1, timeout=5)[0].group_id == a.group_id
        th.join(10)
        assert out[0].kind == pb.ACCEPTED
    assert server.get_batch(1, timeout=5)[0].group_id == b.group_id


def state_dict(seed_shapes):
    return {"embed": torch.randn(*seed_shapes, dtype=torch.bfloat16), "ln.weight": torch.rand(64),
            "ln.bias": torch.zeros(64, dtype=torch.float16), "pos": torch.arange(33, dtype=torch.int64),
            "scale": torch.tensor(0.5)}


def test_watch_weights_delivers_bucketed_tensors(make_server):
    server = make_server(weight_bucket_bytes=4096)
    rng = np.random.default_rng()
    sd = state_dict((int(rng.integers(40, 120)), 64))
    server.publish(1, sd)
    with client(server) as c:
        version, tensors = next(c.watch_weights(from_version=-1))
    assert version == 1 and [n for n, _ in tensors] == list(sd)
    for name, t in tensors:
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape and torch.equal(t, sd[name]), name
    with grpc.insecure_channel(server.address) as ch:  # the chunks on the wire are bucketed
        stream = pb_grpc.LearnerServiceStub(ch).WatchWeights(pb.WatchRequest(from_version=0))
        header = next(stream).header
        chunks = [next(stream).chunk for _ in range(header.num_chunks)]
        stream.cancel()
    assert header.num_chunks > 1 and all(len(ch.data) <= 4096 for ch in chunks)
    assert sum(len(ch.data) for ch in chunks) == sum(t.numel() * t.element_size() for t in sd.values())


def test_reused_buffers_are_overwritten_by_the_next_version(make_server):
    server = make_server(weight_bucket_bytes=4096)
    sds = {v: state_dict((50, 64)) for v in (1, 2)}
    with client(server) as c:
        stream = c.watch_weights(from_version=0, reuse_buffers=True)
        server.publish(1, sds[1])
        v1, t1 = next(stream)
        ptrs = [t.data_ptr() for _, t in t1 if t.numel()]
        server.publish(2, sds[2])
        v2, t2 = next(stream)
        stream.close()
    assert (v1, v2) == (1, 2) and [t.data_ptr() for _, t in t2 if t.numel()] == ptrs  # same memory
    for name, t in t2:
        assert torch.equal(t, sds[2][name]), name


def test_late_subscriber_gets_the_newest_version_and_slow_ones_skip(make_server):
    server = make_server(weight_bucket_bytes=2**20)
    for v in (1, 2, 3):
        server.publish(v, state_dict((8, 8)))
    with client(server) as c:
        stream = c.watch_weights(from_version=-1)
        assert next(stream)[0] == 3
        # While this subscriber does not read, the trainer publishes three 16 MB versions;
        # publish never waits for it, and it then sees the newest, not every one.
        big = {v: {"w": torch.full((2**22,), float(v))} for v in (4, 5, 6)}
        for v in (4, 5, 6):
            server.publish(v, big[v])
        seen = []
        for version, tensors in stream:
            seen.append(version)
            assert torch.equal(tensors[0][1], big[version]["w"])
            if version == 6:
                break
        stream.close()
    assert seen[-1] == 6 and len(seen) < 3 and seen == sorted(seen)


def test_status_reports_version_step_and_trainer_metrics(make_server):
    server = make_server()
    server.hooks = TrainerHooks(status_metrics=lambda: {"loss": 0.25})
    server.publish(3, {})
    server.set_step(17)
    with client(server) as c:
        c.submit([good(versions=(2, 3))])
        st = c.status()
    assert (st.version, st.step, st.buffer_size, st.buffer_capacity) == (3, 17, 1, 8)
    assert st.metrics["loss"] == 0.25 and st.group_size == G and st.max_staleness == 2


def test_client_reconnects_after_restart_and_resubmission_is_deduplicated(make_server):
    first = make_server()
    port = first.port
    g1, g2 = good(), good()
    first.publish(1, {"w": torch.ones(4)})
    c = client(first)
    versions = []
    def watch():
        for v, _ in c.watch_weights(-1):
            versions.append(v)
            if v >= 2:
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert c.submit([g1])[0].kind == pb.ACCEPTED
    deadline = time.monotonic() + 10
    while not versions and time.monotonic() < deadline:
        time.sleep(0.01)
    state = first.state_dict()
    first.stop(0)
    # The learner is down: the submission of g1 again (its ack was "lost") and g2 keeps retrying.
    out = []
    submitter = threading.Thread(target=lambda: out.extend(c.submit([g1, g2])))
    submitter.start()
    time.sleep(0.5)
    assert submitter.is_alive()
    second = LearnerServer(dataclasses.replace(CFG, port=port))
    second.load_state_dict(state)
    second.start()
    try:
        submitter.join(10)
        assert [a.kind for a in out] == [pb.DUPLICATE, pb.ACCEPTED]
        second.publish(2, {"w": torch.full((4,), 2.0)})
        watcher.join(10)
        assert versions == [1, 2]
        st = c.status()
        assert st.counters["accepted"] == 2 and st.counters["duplicate"] == 1 and st.version == 2
        assert {g.group_id for g in second.get_batch(2, timeout=5)} == {g1.group_id, g2.group_id}
    finally:
        c.close()
        second.stop(0)


def test_client_gives_up_after_its_deadline():
    with LearnerClient("127.0.0.1:1", backoff_initial_s=0.01, backoff_max_s=0.05, retry_deadline_s=0.3) as c:
        with pytest.raises(LearnerUnavailable):
            c.status()
