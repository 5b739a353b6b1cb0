"""Transport throughput of the learner service against bare gRPC streaming of the same bytes.

Two measurements, each a ratio weft / raw (higher is better):
  submit   rollout -> learner: `LearnerClient.submit` of fresh random GRPO groups (encode with
           the codec, stream, decode + validate + buffer on the server) vs a bare client stream
           of the already-encoded payloads (same byte strings, same batching) into a sink
           that only counts them. Goal >= 0.7.
  weights  learner -> rollout: `LearnerServer.publish` of a Qwen2.5-0.5B-shaped bf16 state dict
           (hidden 896, 24 layers, intermediate 4864, vocab 151936, 14 q / 2 kv heads, tied
           embeddings: ~494M params, ~0.99 GB) until `LearnerClient.watch_weights` has every
           tensor back, vs a bare server stream of byte chunks of the same sizes (the sizes of
           the published buckets). End to end: the weft time includes publish's snapshot copy
           and the client's reassembly (into buffers reused across versions, reuse_buffers=True,
           as a rollout worker that loads each version into its engine would). Goal >= 0.5.

The servers (LearnerServer and the raw one) run in a spawned child process, the clients in
this one, all on 127.0.0.1; both paths are measured in the same run, alternating, best of
--reps. The server process gets the learner's process settings (learner/runtime.py: gc
freeze, malloc thresholds; the raw server shares them); --no-tune leaves the defaults.
This machine's cores are shared: expect 10-20% noise.

Run: .venv/bin/python bench/transport.py [--groups 300 --group-size 8 --tokens 4096 --batch 8 --reps 3
                                         --bucket-mb 1 --only submit|weights --no-tune]
Prints the numbers, the ratios, then a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.schema import LearnerConfig  # noqa: E402 - light (dataclasses only), after the path fix

GB = 1e9
QWEN05 = dict(hidden=896, layers=24, intermediate=4864, vocab=151936, heads=14, kv_heads=2)


def qwen_shapes(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int) -> dict:
    """Parameter shapes of a Qwen2.5 decoder with tied embeddings."""
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    return shapes


# ---------------------------------------------------------------- child: the servers
def _serve(conn: Any, group_size: int, bucket_bytes: int, capacity: int, tune: bool) -> None:
    import grpc
    import torch

    from learner.runtime import tune_process
    from learner.server import LearnerServer

    max_msg = 256 * 2**20
    cfg = LearnerConfig(group_size=group_size, buffer_capacity=capacity, max_staleness=10**6,
                        weight_bucket_bytes=bucket_bytes, max_message_bytes=max_msg, submit_block_s=60.0)
    server = LearnerServer(cfg).start()
    if tune:  # as LearnerService does in a learner process; the raw server below shares the process
        tune_process(cfg.gc_freeze, cfg.gc_threshold0, cfg.malloc_keep_mb)
    blobs: dict[int, bytes] = {}

    def sink(request_iterator, context):
        return str(sum(len(b) for b in request_iterator)).encode()

    def source(request, context):
        sizes = json.loads(request)
        for size in set(sizes) - set(blobs):  # made before streaming, so the stream only sends
            blobs[size] = os.urandom(size)
        for size in sizes:
            yield blobs[size]

    raw = grpc.server(futures.ThreadPoolExecutor(8), options=[("grpc.max_receive_message_length", max_msg),
                                                            ("grpc.max_send_message_length", max_msg)])
    raw.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("raw.Raw", {
        "Sink": grpc.stream_unary_rpc_method_handler(sink), "Source": grpc.unary_stream_rpc_method_handler(source)})])
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    raw.start()
    state: dict[str, torch.Tensor] = {}
    conn.send({"learner": server.port, "raw": raw_port})
    while True:
        cmd, arg = conn.recv()
        if cmd == "make_weights":
            torch.manual_seed(0)
            state = {n: torch.randn(s, dtype=torch.bfloat16) for n, s in qwen_shapes(**arg).items()}
            conn.send(sum(t.numel() for t in state.values()))
        elif cmd == "publish":
            t0 = time.perf_counter()
            server.publish(arg, state)
            conn.send(time.perf_counter() - t0)
        elif cmd == "chunk_sizes":
            conn.send(server._snapshot.data_bytes)
        elif cmd == "drain":
            n = len(server.buffer)
            taken = server.buffer.get_batch(n, server.version, timeout=0) if n else []
            conn.send((len(taken), server.status().counters["accepted"]))
        elif cmd == "stop":
            server.stop(0)
            raw.stop(0)
            conn.send(True)
            return


# ---------------------------------------------------------------- parent: the clients
def bench_submit(ctl: Any, ports: dict, a: argparse.Namespace) -> dict:
    import grpc
    import numpy as np

    from actors.learner_client import LearnerClient
    from learner.validate import Limits, decode_group
    from protos import learner_pb2 as pb
    from protos.codec import dumps
    from protos.testing import random_group

    rng = np.random.default_rng()
    opts = [("grpc.max_send_message_length", 256 * 2**20), ("grpc.max_receive_message_length", 256 * 2**20)]
    raw_ch = grpc.insecure_channel(f"127.0.0.1:{ports['raw']}", options=opts)
    sink = raw_ch.stream_unary("/raw.Raw/Sink")
    client = LearnerClient(f"127.0.0.1:{ports['learner']}", max_message_bytes=256 * 2**20)
    weft_s, raw_s, nbytes = [], [], 0
    for rep in range(a.reps + 1):  # rep 0 warms both paths up and is not counted
        groups = [random_group(rng, group_size=a.group_size, num_tokens=a.tokens, vocab_size=151936, media=4)
                  for _ in range(a.groups)]
        payloads = [dumps(g) for g in groups]
        nbytes = sum(len(p) for p in payloads)
        batches = range(0, a.groups, a.batch)
        t0 = time.perf_counter()
        for i in batches:
            acks = client.submit(groups[i:i + a.batch])
            assert all(ack.kind == pb.ACCEPTED for ack in acks), acks
        t1 = time.perf_counter()
        ctl.send(("drain", None))
        taken, _ = ctl.recv()
        assert taken == a.groups, (taken, a.groups)
        t2 = time.perf_counter()
        for i in batches:
            got = int(sink(iter(payloads[i:i + a.batch])))
            assert got == sum(len(p) for p in payloads[i:i + a.batch])
        t3 = time.perf_counter()
        if rep:
            weft_s.append(t1 - t0)
            raw_s.append(t3 - t2)
    client.close()
    raw_ch.close()
    # Where the time goes: the Python work per group on each side, timed alone in this process.
    t0 = time.perf_counter()
    payloads = [dumps(g) for g in groups]
    t1 = time.perf_counter()
    limits = Limits(a.group_size, 0)
    assert all(decode_group(p, limits)[1] is None for p in payloads)
    t2 = time.perf_counter()
    weft, raw = nbytes / min(weft_s) / GB, nbytes / min(raw_s) / GB
    return {"submit_bytes": nbytes, "submit_groups": a.groups, "submit_group_bytes": nbytes // a.groups,
            "submit_weft_gbps": weft, "submit_raw_gbps": raw, "submit_ratio": weft / raw,
            "submit_groups_per_s": a.groups / min(weft_s), "submit_raw_ms_per_group": min(raw_s) / a.groups * 1e3,
            "encode_ms_per_group": (t1 - t0) / a.groups * 1e3, "decode_validate_ms_per_group": (t2 - t1) / a.groups * 1e3}


def bench_weights(ctl: Any, ports: dict, a: argparse.Namespace) -> dict:
    import grpc

    from actors.learner_client import LearnerClient

    ctl.send(("make_weights", QWEN05))
    params = ctl.recv()
    opts = [("grpc.max_receive_message_length", 256 * 2**20)]
    raw_ch = grpc.insecure_channel(f"127.0.0.1:{ports['raw']}", options=opts)
    source = raw_ch.unary_stream("/raw.Raw/Source")
    client = LearnerClient(f"127.0.0.1:{ports['learner']}", max_message_bytes=256 * 2**20)
    stream = client.watch_weights(from_version=-1, reuse_buffers=True)  # as a rollout worker would
    weft_s, raw_s, publish_s, sizes = [], [], [], []
    for rep in range(a.reps + 1):  # rep 0 warms up
        version = 100 + rep
        t0 = time.perf_counter()
        ctl.send(("publish", version))
        got, tensors = next(stream)
        t1 = time.perf_counter()
        assert got == version and len(tensors) == len(qwen_shapes(**QWEN05)), (got, len(tensors))
        del tensors
        pub = ctl.recv()
        if not sizes:
            ctl.send(("chunk_sizes", None))
            sizes = ctl.recv()
        t2 = time.perf_counter()
        n = sum(len(b) for b in source(json.dumps(sizes).encode()))
        t3 = time.perf_counter()
        assert n == sum(sizes)
        if rep:
            weft_s.append(t1 - t0)
            raw_s.append(t3 - t2)
            publish_s.append(pub)
    stream.close()
    client.close()
    raw_ch.close()
    nbytes = sum(sizes)
    weft, raw = nbytes / min(weft_s) / GB, nbytes / min(raw_s) / GB
    return {"weights_params": params, "weights_bytes": nbytes, "weights_chunks": len(sizes),
            "weights_weft_s": min(weft_s), "weights_raw_s": min(raw_s), "weights_publish_s": min(publish_s),
            "weights_weft_gbps": weft, "weights_raw_gbps": raw, "weights_ratio": weft / raw}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=300, help="groups per repetition")
    p.add_argument("--group-size", type=int, default=8, help="trajectories per group (G)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per trajectory")
    p.add_argument("--batch", type=int, default=8, help="groups per SubmitGroups stream")
    p.add_argument("--bucket-mb", type=float, default=LearnerConfig().weight_bucket_bytes / 2**20,
                   help="weight chunk size (MiB); default: learner.weight_bucket_bytes")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--only", choices=["submit", "weights"], help="run one of the two benchmarks")
    p.add_argument("--no-tune", action="store_true", help="leave the server process's gc and malloc settings at "
                   "Python's and glibc's defaults (learner/runtime.py; a learner process applies them)")
    a = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    ctl, child_end = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child_end, a.group_size, int(a.bucket_mb * 2**20), a.groups, not a.no_tune),
                       daemon=True)
    proc.start()
    try:
        ports = ctl.recv()
        res: dict = {}
        if a.only != "weights":
            res.update(bench_submit(ctl, ports, a))
            print(f"submit : {res['submit_groups']} groups x {res['submit_group_bytes'] / 1e6:.2f} MB, batches of {a.batch}: "
                  f"weft {res['submit_weft_gbps']:.3f} GB/s ({res['submit_groups_per_s']:.0f} groups/s), "
                  f"raw {res['submit_raw_gbps']:.3f} GB/s, ratio {res['submit_ratio']:.2f} (goal >= 0.7)\n"
                  f"         per group: raw stream {res['submit_raw_ms_per_group']:.2f} ms; codec encode "
                  f"{res['encode_ms_per_group']:.2f} ms (client), decode + validate {res['decode_validate_ms_per_group']:.2f} ms (server)")
        if a.only != "submit":
            res.update(bench_weights(ctl, ports, a))
            print(f"weights: {res['weights_params'] / 1e6:.0f}M params bf16 = {res['weights_bytes'] / GB:.2f} GB in "
                  f"{res['weights_chunks']} chunks: weft {res['weights_weft_s']:.2f} s end to end "
                  f"(publish snapshot {res['weights_publish_s']:.2f} s) = {res['weights_weft_gbps']:.3f} GB/s, "
                  f"raw {res['weights_raw_s']:.2f} s = {res['weights_raw_gbps']:.3f} GB/s, "
                  f"ratio {res['weights_ratio']:.2f} (goal >= 0.5)")
        ctl.send(("stop", None))
        ctl.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    res.update({"tuned": not a.no_tune, "reps": a.reps, "tokens": a.tokens, "group_size": a.group_size, "batch": a.batch,
                "bucket_bytes": int(a.bucket_mb * 2**20), "cpus": os.cpu_count()})
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
