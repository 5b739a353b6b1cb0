"""The rollout side's client of the learner service: submit groups, watch weights, read status.

Rollout workers come and go while the learner trains, and the learner itself may
restart, so every call reconnects with exponential backoff and full jitter
(delay ~ U(0, min(max, initial * 2^attempt))) until `retry_deadline_s` passes
without reaching the learner. Resubmitting after a broken stream is safe: the
server acknowledges an already-accepted group as DUPLICATE and counts it once.
A RETRY_LATER ack (learner buffer full) is honoured by waiting at least its
`retry_after_s` and resubmitting just those groups: slowed, never dropped.

Talks to the learner through protos/ only (the stubs and the one codec).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TypeVar, Union

import grpc
import numpy as np
import torch

from configs.schema import LearnerConfig
from protos import learner_pb2 as pb
from protos import learner_pb2_grpc as pb_grpc
from protos.codec import dumps_framed
from protos.wire import field_head, read_varint
from protos.records import Group

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes worth another try: the learner is down or restarting (UNAVAILABLE), the stream was
# cut by a server shutdown (CANCELLED / UNKNOWN / ABORTED), or a per-call deadline passed.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED}
_TORCH_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}


class LearnerUnavailable(ConnectionError):
    """The learner could not be reached for longer than the retry deadline."""


class WeightStreamError(RuntimeError):
    """The weight stream broke its own contract (unknown dtype, chunk out of order, missing bytes)."""


def ack_code(ack: pb.Ack) -> grpc.StatusCode:
    """An Ack's status code as a grpc.StatusCode."""
    return next(c for c in grpc.StatusCode if c.value[0] == ack.code)


class LearnerClient:
    """`submit`, `watch_weights`, `status` against one learner address, with reconnects."""

    def __init__(self, address: str, token: Optional[str] = None, *, max_message_bytes: int = 64 * 2**20,
                 backoff_initial_s: float = 0.1, backoff_max_s: float = 5.0, retry_deadline_s: float = 600.0,
                 rpc_timeout_s: Optional[float] = None) -> None:
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_deadline_s = retry_deadline_s
        self.rpc_timeout_s = rpc_timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        backoff_ms = int(backoff_max_s * 1000)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC's own reconnect backoff grows to 120 s by default; keep it within ours so a
            # restarted learner is found within backoff_max_s.
            ("grpc.initial_reconnect_backoff_ms", min(int(backoff_initial_s * 1000) + 1, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(int(backoff_initial_s * 1000) + 1, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms)])
        self._stub = pb_grpc.LearnerServiceStub(self._channel)
        # SubmitGroups taking requests already serialized by encode_group (one copy of the payload
        # instead of protobuf's two): the same GroupMessage bytes on the wire as the stub would send.
        self._submit_groups = self._channel.stream_unary(
            f"/{pb.DESCRIPTOR.services_by_name['LearnerService'].full_name}/SubmitGroups",
            request_serializer=None, response_deserializer=pb.SubmitReply.FromString)
        # WatchWeights reading each chunk's tensor bytes as a view of the received message
        # (parse_weight_message) instead of protobuf's two copies.
        self._watch_weights = self._channel.unary_stream(
            f"/{pb.DESCRIPTOR.services_by_name['LearnerService'].full_name}/WatchWeights",
            request_serializer=pb.WatchRequest.SerializeToString, response_deserializer=parse_weight_message)
        self._closed = threading.Event()

    @classmethod
    def from_config(cls, cfg: LearnerConfig, address: Optional[str] = None) -> "LearnerClient":
        """A client for the learner `cfg` describes (address defaults to cfg.host:cfg.port)."""
        token = cfg.token or (os.environ.get(cfg.token_env) if cfg.token_env else None)
        return cls(address or f"{cfg.host}:{cfg.port}", token, max_message_bytes=cfg.max_message_bytes,
                   backoff_initial_s=cfg.backoff_initial_s, backoff_max_s=cfg.backoff_max_s,
                   retry_deadline_s=cfg.retry_deadline_s)

    def close(self) -> None:
        self._closed.set()
        self._channel.close()

    def __enter__(self) -> "LearnerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- submit
    def submit(self, groups: Sequence[Group]) -> list[pb.Ack]:
        """Send groups; one Ack per group, in order. ACCEPTED and DUPLICATE both mean delivered.

        Retries the whole stream on a broken connection and the RETRY_LATER groups after
        the learner's hint; raises LearnerUnavailable past the deadline, grpc.RpcError for
        a non-retryable failure (UNAUTHENTICATED, RESOURCE_EXHAUSTED), ValueError for a
        group bigger than max_message_bytes (the groups before it were delivered;
        submitting them again is safe).
        """
        acks: dict[int, pb.Ack] = {}
        pending = list(range(len(groups)))
        while pending:
            too_big: list[str] = []
            # Encoded lazily, on gRPC's sending thread: group i+1 is encoded while group i is on
            # the wire and in the learner's hands. Re-encoded on a retry (rare) rather than kept.
            reply = self._retrying(lambda: self._submit_groups(
                self._messages(groups, pending, too_big), metadata=self._metadata, timeout=self.rpc_timeout_s))
            if too_big:
                raise ValueError(too_big[0])
            if len(reply.acks) != len(pending):
                raise RuntimeError(f"learner answered {len(reply.acks)} acks for {len(pending)} groups")
            retry, wait = [], 0.0
            for i, ack in zip(pending, reply.acks):
                if ack.kind == pb.RETRY_LATER:
                    retry.append(i)
                    wait = max(wait, ack.retry_after_s)
                else:
                    acks[i] = ack
            pending = retry
            if pending:
                log.debug("learner buffer full: %d groups wait %.2f s", len(pending), wait)
                self._sleep(wait * (1.0 + 0.5 * random.random()))  # jitter so workers do not return in lockstep
        return [acks[i] for i in range(len(groups))]

    def _messages(self, groups: Sequence[Group], which: list[int], too_big: list[str]) -> Iterator[bytes]:
        too_big.clear()
        for i in which:
            msg = encode_group(groups[i])
            if len(msg) > self.max_message_bytes:
                # Ending the stream here (rather than raising on gRPC's thread, which would read as a
                # retryable cancellation) lets the learner ack the groups before this one.
                too_big.append(f"group {groups[i].group_id}: {len(msg)} bytes > max_message_bytes {self.max_message_bytes}")
                return
            yield msg

    # ---- status
    def status(self) -> pb.StatusReply:
        return self._retrying(lambda: self._stub.GetStatus(pb.StatusRequest(), metadata=self._metadata,
                                                           timeout=self.rpc_timeout_s))

    # ---- weights
    def watch_weights(self, from_version: int = -1, announce_only: bool = False, reuse_buffers: bool = False
                      ) -> Iterator[tuple[int, list[tuple[str, torch.Tensor]]]]:
        """Yield (version, [(name, tensor), ...]) for each newer version, reconnecting as needed.

        Skipped versions are normal: the learner sends a slow subscriber the newest one.
        With announce_only the list is empty. Stop by closing the iterator or the client.
        With reuse_buffers, each version is written into the previous version's tensors
        (same name and size), so the tensors are valid only until the next iteration: load
        them (an engine's load_weights copies) before asking for more. This spares
        allocating and first-touching a whole new state dict per version.
        """
        last, attempt, since = from_version, 0, None
        pool: Optional[dict[str, np.ndarray]] = {} if reuse_buffers else None
        while not self._closed.is_set():
            call = self._watch_weights(pb.WatchRequest(from_version=last, announce_only=announce_only),
                                       metadata=self._metadata)
            try:
                for version, tensors in _assemble(call, announce_only, pool):
                    last, attempt, since = version, 0, None
                    yield version, tensors
            except grpc.RpcError as e:
                if self._closed.is_set():
                    return
                if e.code() not in RETRYABLE:
                    raise
                (log.info if attempt == 0 else log.debug)("weight stream from %s broke (%s); reconnecting",
                                                          self.address, e.code().name)
            finally:
                call.cancel()
            since = since or time.monotonic()
            self._backoff(attempt, since)
            attempt += 1

    # ---- retry machinery
    def _retrying(self, rpc: Callable[[], T]) -> T:
        attempt, since = 0, time.monotonic()
        while True:
            try:
                return rpc()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or self._closed.is_set():
                    raise
                (log.info if attempt == 0 else log.debug)("learner %s: %s; retrying", self.address, e.code().name)
            self._backoff(attempt, since)
            attempt += 1

    def _backoff(self, attempt: int, since: float) -> None:
        if self.retry_deadline_s and time.monotonic() - since > self.retry_deadline_s:
            raise LearnerUnavailable(f"learner {self.address} unreachable for {self.retry_deadline_s:.0f} s")
        self._sleep(random.uniform(0.0, min(self.backoff_max_s, self.backoff_initial_s * 2 ** attempt)))

    def _sleep(self, seconds: float) -> None:
        if self._closed.wait(seconds):
            raise LearnerUnavailable("client closed")


def group_message(group_id: str, payload: bytes) -> bytes:
    """pb.GroupMessage(group_id=..., payload=...).SerializeToString(), byte for byte."""
    return _group_message_head(group_id)(len(payload)) + payload


def encode_group(group: Group) -> bytes:
    """The serialized GroupMessage of `group`, the same bytes as protobuf's, with one copy of the payload.

    Building a pb.GroupMessage copies the payload and serializing it copies it again
    (together ~0.5 ms for a 0.43 MB group, more than encoding it); here the codec writes
    the protobuf header in front of its own output in one join.
    """
    return dumps_framed(group, _group_message_head(group.group_id))


def _group_message_head(group_id: str) -> Callable[[int], bytes]:
    """The GroupMessage bytes before a payload of n bytes: fields in number order, empty ones left
    out (protobuf's canonical form; a test compares with SerializeToString)."""
    gid = group_id.encode("utf-8")
    gid_field = field_head(1, len(gid)) + gid if gid else b""
    return lambda n: gid_field + (field_head(2, n) if n else b"")


class WeightPiece(NamedTuple):
    """One WeightMessage: a header, or a chunk's metadata with its tensor bytes apart (often a view)."""

    header: Optional[pb.VersionHeader]
    chunk: Optional[pb.WeightChunk]  # its `data` field may be empty: the bytes are in `data`
    data: Union[bytes, memoryview]


def parse_weight_message(data: bytes) -> WeightPiece:
    """A serialized WeightMessage as a WeightPiece, with a chunk's tensor bytes a view of `data`.

    pb.WeightMessage.FromString copies a chunk's bytes and reading `.chunk.data` copies them
    again (1 MiB a chunk, the whole model per version). Here only the chunk's other fields
    (version, index, slices: a few hundred bytes) go through protobuf. Anything but a message
    holding one chunk of known-shaped fields goes to protobuf whole, which then decides.
    """
    n = len(data)
    if n and data[0] == 0x12:  # field 2 (chunk), length-delimited, as the learner sends it
        length, pos = read_varint(data, 1)
        if length >= 0 and pos + length == n:
            view, meta, payload = memoryview(data), [], memoryview(data)[0:0]
            while pos < n:
                start = pos
                tag, pos = read_varint(data, pos)
                if tag < 0 or tag & 7 not in (0, 2):
                    break
                value, pos = read_varint(data, pos)
                if value < 0 or (tag & 7 == 2 and pos + value > n):
                    break
                if tag & 7 == 2:
                    pos += value
                if tag == 0x22:  # field 4 (data); repeated, the last one wins, as in protobuf
                    payload = view[pos - value:pos]
                else:
                    meta.append(view[start:pos])
            else:
                return WeightPiece(None, pb.WeightChunk.FromString(b"".join(meta)), payload)
    return _piece(pb.WeightMessage.FromString(data))


def _piece(msg: Union[pb.WeightMessage, WeightPiece]) -> WeightPiece:
    if isinstance(msg, WeightPiece):
        return msg
    if msg.HasField("chunk"):
        return WeightPiece(None, msg.chunk, msg.chunk.data)
    return WeightPiece(msg.header if msg.HasField("header") else None, None, b"")


def _assemble(messages: Iterator[Union[pb.WeightMessage, WeightPiece]], announce_only: bool,
              pool: Optional[dict[str, np.ndarray]] = None) -> Iterator[tuple[int, list[tuple[str, torch.Tensor]]]]:
    """Rebuild whole tensors from a header + chunks stream, one version at a time.

    `pool` (name -> uint8 buffer), when given, supplies and keeps the buffers for reuse.
    """
    header: Optional[pb.VersionHeader] = None
    bufs: dict[str, tuple[np.ndarray, pb.TensorSlice]] = {}
    got, seen_chunks = {}, 0
    for msg in messages:
        new_header, chunk, payload = _piece(msg)
        if chunk is None:
            if new_header is None:
                raise WeightStreamError("a weight message with neither header nor chunk")
            header, bufs, got, seen_chunks = new_header, {}, {}, 0
            if announce_only or header.num_chunks == 0:
                yield header.version, []
                header = None
            continue
        if header is None or chunk.version != header.version or chunk.index != seen_chunks:
            raise WeightStreamError(f"chunk {chunk.index} of version {chunk.version} out of order")
        data = np.frombuffer(payload, dtype=np.uint8)
        for s in chunk.slices:
            if s.name not in bufs:
                if s.dtype not in _TORCH_DTYPES:
                    raise WeightStreamError(f"tensor {s.name}: unknown dtype {s.dtype!r}")
                buf = pool.get(s.name) if pool is not None else None
                if buf is None or buf.size != s.tensor_nbytes:
                    buf = np.empty(s.tensor_nbytes, np.uint8)
                    if pool is not None:
                        pool[s.name] = buf
                bufs[s.name] = (buf, s)
                got[s.name] = 0
            buf = bufs[s.name][0]
            buf[s.tensor_offset:s.tensor_offset + s.nbytes] = data[s.data_offset:s.data_offset + s.nbytes]
            got[s.name] += s.nbytes
        seen_chunks += 1
        if seen_chunks == header.num_chunks:
            yield header.version, _tensors(bufs, got, header)
            header = None


def _tensors(bufs: dict[str, tuple[np.ndarray, pb.TensorSlice]], got: dict[str, int],
             header: pb.VersionHeader) -> list[tuple[str, torch.Tensor]]:
    if len(bufs) != header.num_tensors:
        raise WeightStreamError(f"version {header.version}: {len(bufs)} tensors, header says {header.num_tensors}")
    out = []
    for name, (buf, meta) in bufs.items():
        if got[name] != meta.tensor_nbytes:
            raise WeightStreamError(f"tensor {name}: {got[name]} of {meta.tensor_nbytes} bytes arrived")
        dtype, shape = _TORCH_DTYPES[meta.dtype], tuple(meta.shape)
        # An empty tensor has no bytes to reinterpret (torch refuses to view a 0-stride buffer).
        t = torch.from_numpy(buf).view(dtype).reshape(shape) if buf.size else torch.empty(shape, dtype=dtype)
        out.append((name, t))
    return out
