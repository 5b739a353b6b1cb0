"""The learner's gRPC service (`weft.v1.LearnerService`): groups in, weights out, status.

`LearnerServer` owns the wire side of the learner: the staleness-bounded buffer,
the weight version and the trainer step, the latest published weights, and the
gRPC server with its token check and size limits. The trainer plugs in through
three calls and one optional hook:

    server = LearnerServer(cfg.learner, TrainerHooks(status_metrics=lambda: {"loss": loss}))
    server.start()                                  # binds cfg.host:cfg.port (0 = free port)
    groups = server.get_batch(n_groups, timeout=60) # fresh groups, staleness re-checked
    server.set_step(step)
    server.publish(version, model.named_parameters())   # snapshot, then stream to every subscriber
    ckpt["learner_server"] = server.state_dict()    # seen-set + waiting groups, for exactly-once across restarts

Decisions (see protos/learner.proto for the wire):
* SubmitGroups is client-streaming with ONE reply holding an Ack per group; a bad
  group is answered REJECTED / INVALID_ARGUMENT in its Ack and the stream goes on.
* A full buffer blocks the stream (gRPC flow control slows the sender) for up to
  `submit_block_s`, then the rest of that stream is acked RETRY_LATER with a hint.
* `publish` cuts the tensors into serialized chunk messages before returning (a copy),
  so the trainer may update its weights right after; every subscriber streams that
  newest snapshot at its own pace and skips versions it was too slow for.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Union

import grpc
import torch

from configs.schema import LearnerConfig
from learner.buffer import GroupBuffer, make_ack
from learner.validate import Limits, decode_group, reason_of
from protos import learner_pb2 as pb
from protos.records import Group
from protos.wire import field_head, read_varint

log = logging.getLogger(__name__)

NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class TrainerHooks:
    """What the server asks of the trainer. Every hook is optional."""

    status_metrics: Optional[Callable[[], Mapping[str, float]]] = None  # extra numbers for GetStatus (loss, lr, ...)


@dataclass
class WeightSnapshot:
    """One published version as serialized WeightMessages: a header, then its chunks.

    Serialized once per publish, not once per subscriber: every subscriber's stream then
    sends the same bytes, as a bare byte stream would. (Serializing lazily, as the first
    subscriber streams, measured slower end to end in bench/transport.py and did not
    shorten publish either.)
    """

    version: int
    header: bytes
    chunks: list[bytes]
    data_bytes: list[int]  # tensor bytes carried by each chunk

    def messages(self) -> Iterator[bytes]:
        yield self.header
        yield from self.chunks


def resolve_token(cfg: LearnerConfig) -> Optional[str]:
    """The shared secret: cfg.token, else the variable cfg.token_env names (which must then be set)."""
    if cfg.token:
        return cfg.token
    if cfg.token_env:
        token = os.environ.get(cfg.token_env)
        if not token:
            raise ValueError(f"learner.token_env names {cfg.token_env!r}, which is unset or empty")
        return token
    return None


def tensor_bytes(t: torch.Tensor):
    """A flat uint8 numpy view of a CPU contiguous copy-or-view of `t` (no copy when already so)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def build_snapshot(version: int, named_tensors: NamedTensors, bucket_bytes: int) -> WeightSnapshot:
    """Cut tensors into chunks of at most `bucket_bytes`: small tensors share a chunk, big ones span several.

    The bytes are copied here, so the caller's tensors may change afterwards.
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    names: set[str] = set()  # consumed lazily: a sharded learner gathers the tensors a bucket at a time
    chunks: list[bytes] = []
    data_bytes: list[int] = []
    slices: list[pb.TensorSlice] = []
    parts: list[Any] = []
    filled = 0

    def flush() -> None:
        nonlocal slices, parts, filled
        # WeightMessage{chunk: WeightChunk{version, index, slices, data}} serialized by hand with the
        # data field last (protobuf's field order): one copy of the tensor bytes instead of three.
        meta = pb.WeightChunk(version=version, index=len(chunks), slices=slices).SerializeToString()
        data_head = field_head(4, filled) if filled else b""
        chunk_len = len(meta) + len(data_head) + filled
        chunks.append(b"".join([field_head(2, chunk_len), meta, data_head, *parts]))
        data_bytes.append(filled)
        slices, parts, filled = [], [], 0

    for name, t in items:
        if name in names:
            raise ValueError(f"publish: tensor names must be unique ({name!r} twice)")
        names.add(name)
        flat = tensor_bytes(t)
        n = int(flat.size)
        meta = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "tensor_nbytes": n}
        off = 0
        while True:
            take = min(n - off, bucket_bytes - filled)
            slices.append(pb.TensorSlice(**meta, tensor_offset=off, data_offset=filled, nbytes=take))
            parts.append(flat[off:off + take])
            off += take
            filled += take
            if filled == bucket_bytes:
                flush()
            if off >= n:
                break
    if slices:
        flush()
    header = pb.VersionHeader(version=version, num_chunks=len(chunks), num_tensors=len(names),
                              total_bytes=sum(data_bytes))
    return WeightSnapshot(version, pb.WeightMessage(header=header).SerializeToString(), chunks, data_bytes)


class _TokenAuth(grpc.ServerInterceptor):
    """Refuses every call without the shared secret with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def _allowed(self, metadata: Iterable[Any]) -> bool:
        for key, value in metadata or ():
            given = _token_in(key, value.decode() if isinstance(value, bytes) else value)
            if given is not None and hmac.compare_digest(given.encode(), self._token):  # constant time
                return True
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or self._allowed(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler)


def _token_in(key: str, value: str) -> Optional[str]:
    """The token a metadata entry carries, if it is one of the two accepted forms."""
    if key == "x-weft-token":
        return value
    if key == "authorization" and value.startswith("Bearer "):
        return value[len("Bearer "):]
    return None


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""
    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong learner token")

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


SERVICE = pb.DESCRIPTOR.services_by_name["LearnerService"]
_GROUP_ID_TAG, _PAYLOAD_TAG = 0x0A, 0x12  # GroupMessage fields 1 and 2, wire type 2 (length-delimited)


class Submission(NamedTuple):
    """One received GroupMessage: its group id and a zero-copy view of its payload."""

    group_id: str
    payload: Union[memoryview, bytes]


def parse_group_message(data: bytes) -> Submission:
    """A GroupMessage's fields without protobuf's copies of the payload.

    pb.GroupMessage.FromString copies the payload once and reading `.payload` copies it again
    (a few hundred kB a group); here the payload is a view of the received bytes. Anything
    but the two known length-delimited fields (unknown fields, a truncated or over-long
    length, a group id that is not UTF-8) goes to protobuf itself, so what is accepted, and
    what raises (gRPC then fails the call with INTERNAL), is exactly what protobuf decides.
    """
    n, pos = len(data), 0
    gid, payload = b"", memoryview(data)[0:0]
    while pos < n:
        tag = data[pos]
        if tag not in (_GROUP_ID_TAG, _PAYLOAD_TAG):
            return _parse_slow(data)
        length, pos = read_varint(data, pos + 1)
        if length < 0 or pos + length > n:
            return _parse_slow(data)
        if tag == _GROUP_ID_TAG:
            gid = data[pos:pos + length]
        else:
            payload = memoryview(data)[pos:pos + length]  # a repeated field: the last one wins, as in protobuf
        pos += length
    try:
        return Submission(gid.decode("utf-8"), payload)
    except UnicodeDecodeError:
        return _parse_slow(data)


def _parse_slow(data: bytes) -> Submission:
    msg = pb.GroupMessage.FromString(data)
    return Submission(msg.group_id, msg.payload)


def _service_handler(s: "LearnerServer") -> grpc.GenericRpcHandler:
    """The LearnerService methods, registered by hand rather than with the generated
    add_LearnerServiceServicer_to_server for one reason: WatchWeights sends the
    snapshot's pre-serialized bytes (no per-subscriber serializer). The wire is the
    same protobuf the generated stubs read."""
    return grpc.method_handlers_generic_handler(SERVICE.full_name, {
        "SubmitGroups": grpc.stream_unary_rpc_method_handler(
            lambda requests, context: s._submit(requests), request_deserializer=parse_group_message,
            response_serializer=pb.SubmitReply.SerializeToString),
        "WatchWeights": grpc.unary_stream_rpc_method_handler(
            s._watch, request_deserializer=pb.WatchRequest.FromString, response_serializer=None),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            lambda request, context: s.status(), request_deserializer=pb.StatusRequest.FromString,
            response_serializer=pb.StatusReply.SerializeToString),
    })


class LearnerServer:
    """The gRPC side of the learner; in-process (tests, a CPU learner) or inside the learner actor."""

    def __init__(self, cfg: LearnerConfig, trainer_hooks: Optional[TrainerHooks] = None) -> None:
        if cfg.weight_bucket_bytes > cfg.max_message_bytes // 2:
            raise ValueError(f"learner.weight_bucket_bytes ({cfg.weight_bucket_bytes}) must be at most half of "
                             f"learner.max_message_bytes ({cfg.max_message_bytes}), leaving room for tensor metadata")
        self.cfg = cfg
        self.hooks = trainer_hooks or TrainerHooks()
        self.buffer = GroupBuffer(cfg.buffer_capacity, cfg.max_staleness, dedup_window=cfg.dedup_window,
                                  retry_after_s=cfg.retry_after_s)
        self._token = resolve_token(cfg)
        self._lock = threading.Condition()  # guards version, step, snapshot, subscribers; signals new weights
        self._version = 0
        self._step = 0
        self._snapshot: Optional[WeightSnapshot] = None
        self._subscribers = 0
        self._warned: set[str] = set()
        self._stopping = threading.Event()
        self._server: Optional[grpc.Server] = None
        self._port = cfg.port

    # ---- lifecycle
    def start(self) -> "LearnerServer":
        if self._stopping.is_set():
            raise RuntimeError("a stopped LearnerServer does not restart: build a new one and load_state_dict()")
        opts = [("grpc.max_receive_message_length", self.cfg.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.max_message_bytes),
                # Two learners must never share a port (rollout workers would be split between them).
                ("grpc.so_reuseport", 0)]
        interceptors = [_TokenAuth(self._token)] if self._token else []
        server = grpc.server(futures.ThreadPoolExecutor(self.cfg.max_workers, thread_name_prefix="learner-rpc"),
                             interceptors=interceptors, options=opts)
        server.add_generic_rpc_handlers([_service_handler(self)])
        try:
            self._port = server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        except RuntimeError as e:
            raise OSError(f"learner cannot bind {self.cfg.host}:{self.cfg.port}: {e}") from None
        server.start()
        self._server = server
        log.info("learner service on %s (token %s)", self.address, "required" if self._token else "off")
        return self

    def stop(self, grace: Optional[float] = None) -> None:
        """Stop serving; in-flight calls get `grace` s (default cfg.stop_grace_s). Blocked waiters wake up."""
        self._stopping.set()
        self.buffer.close()
        with self._lock:
            self._lock.notify_all()
        if self._server is not None:
            self._server.stop(self.cfg.stop_grace_s if grace is None else grace).wait()
            self._server = None

    def __enter__(self) -> "LearnerServer":
        return self if self._server is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self._port}"

    # ---- what the trainer calls
    @property
    def version(self) -> int:
        return self._version

    @property
    def step(self) -> int:
        return self._step

    def set_step(self, step: int) -> None:
        self._step = int(step)

    def advance_version(self, version: int) -> None:
        """Move the current version up to `version` without publishing (a learner resumed after a crash
        continues above every version its lost predecessor may have handed out)."""
        with self._lock:
            self._version = max(self._version, int(version))

    def get_batch(self, n_groups: int, timeout: Optional[float] = None) -> list[Group]:
        """`n_groups` fresh groups for the next step, or [] after `timeout` s (see GroupBuffer.get_batch)."""
        return self.buffer.get_batch(n_groups, self._version, timeout)

    def publish(self, version: int, named_tensors: NamedTensors) -> None:
        """Make `version` the current one and stream these weights to every WatchWeights subscriber.

        Versions only go up. Returns once the snapshot is cut; sending happens on the
        subscribers' own threads, so a slow subscriber never stalls the trainer. Memory:
        the newest snapshot, plus an older one while some subscriber is still sending it.
        """
        with self._lock:
            newest = self._snapshot.version if self._snapshot else -1
            if version < self._version or version <= newest:
                raise ValueError(f"publish: version {version} is not newer than {max(self._version, newest)}")
        snap = build_snapshot(int(version), named_tensors, self.cfg.weight_bucket_bytes)
        with self._lock:
            self._snapshot = snap
            self._version = int(version)
            self._lock.notify_all()

    def status(self) -> pb.StatusReply:
        stats = self.buffer.stats()
        metrics: dict[str, float] = {}
        if self.hooks.status_metrics is not None:
            try:
                metrics = {k: float(v) for k, v in self.hooks.status_metrics().items()}
            except Exception as e:  # noqa: BLE001 - a broken metrics hook must not break GetStatus
                log.warning("status_metrics hook failed: %s", e)
        return pb.StatusReply(version=self._version, step=self._step, buffer_size=stats["size"],
                              buffer_capacity=stats["capacity"], counters=stats["counters"],
                              rejected=stats["rejected"], staleness=stats["staleness"], metrics=metrics,
                              subscribers=self._subscribers, max_staleness=self.cfg.max_staleness,
                              group_size=self.cfg.group_size)

    def state_dict(self) -> dict[str, Any]:
        """Version, step and the buffer (seen-set and waiting groups); plain types, for the trainer's checkpoint."""
        return {"version": self._version, "step": self._step, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._version = int(state["version"])
        self._step = int(state["step"])
        self.buffer.load_state_dict(state["buffer"])

    # ---- RPC bodies
    def _submit(self, messages: Iterator[Submission]) -> pb.SubmitReply:
        acks = []
        block = self.cfg.submit_block_s
        for msg in messages:
            ack = self._admit(msg, block)
            if ack.kind == pb.RETRY_LATER:
                block = 0.0  # the buffer stayed full: answer the rest of this stream at once
            acks.append(ack)
        return pb.SubmitReply(acks=acks)

    def _admit(self, msg: Submission, block: float) -> pb.Ack:
        version = self._version
        limits = Limits(self.cfg.group_size, version, self.cfg.vocab_size, self.cfg.image_token_id)
        group, err = decode_group(msg.payload, limits, msg.group_id)
        if err is None:
            return self.buffer.put(group, version, timeout=block)
        reason = reason_of(err)
        self.buffer.count_rejection(reason)
        # First of each reason loudly, the rest quietly: one buggy worker must not flood the log.
        (log.debug if reason in self._warned else log.warning)("rejected group %r: %s", msg.group_id, err)
        self._warned.add(reason)
        return make_ack(msg.group_id, pb.REJECTED, version, reason, err)

    def _watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        last = request.from_version
        with self._lock:
            self._subscribers += 1
        try:
            while not self._stopping.is_set() and context.is_active():
                snap = self._newer_than(last, wait=0.5)
                if snap is None:
                    continue
                if request.announce_only:
                    yield snap.header
                else:
                    yield from snap.messages()
                last = snap.version  # the next loop takes the newest version, skipping any in between
        finally:
            with self._lock:
                self._subscribers -= 1

    def _newer_than(self, version: int, wait: float) -> Optional[WeightSnapshot]:
        with self._lock:
            if self._snapshot is None or self._snapshot.version <= version:
                self._lock.wait(wait)
            snap = self._snapshot
            return snap if snap is not None and snap.version > version else None
