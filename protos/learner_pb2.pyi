from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_KIND_UNSPECIFIED: _ClassVar[AckKind]
    ACCEPTED: _ClassVar[AckKind]
    DUPLICATE: _ClassVar[AckKind]
    STALE: _ClassVar[AckKind]
    REJECTED: _ClassVar[AckKind]
    RETRY_LATER: _ClassVar[AckKind]
ACK_KIND_UNSPECIFIED: AckKind
ACCEPTED: AckKind
DUPLICATE: AckKind
STALE: AckKind
REJECTED: AckKind
RETRY_LATER: AckKind

class GroupMessage(_message.Message):
    __slots__ = ("group_id", "payload")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    payload: bytes
    def __init__(self, group_id: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("group_id", "kind", "code", "reason", "detail", "learner_version", "retry_after_s")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    LEARNER_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    kind: AckKind
    code: int
    reason: str
    detail: str
    learner_version: int
    retry_after_s: float
    def __init__(self, group_id: _Optional[str] = ..., kind: _Optional[_Union[AckKind, str]] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., learner_version: _Optional[int] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[Ack]
    def __init__(self, acks: _Optional[_Iterable[_Union[Ack, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("from_version", "announce_only")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    announce_only: bool
    def __init__(self, from_version: _Optional[int] = ..., announce_only: _Optional[bool] = ...) -> None: ...

class TensorSlice(_message.Message):
    __slots__ = ("name", "dtype", "shape", "tensor_nbytes", "tensor_offset", "data_offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_NBYTES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    tensor_nbytes: int
    tensor_offset: int
    data_offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., tensor_nbytes: _Optional[int] = ..., tensor_offset: _Optional[int] = ..., data_offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "index", "slices", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    index: int
    slices: _containers.RepeatedCompositeFieldContainer[TensorSlice]
    data: bytes
    def __init__(self, version: _Optional[int] = ..., index: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[TensorSlice, _Mapping]]] = ..., data: _Optional[bytes] = ...) -> None: ...

class VersionHeader(_message.Message):
    __slots__ = ("version", "num_chunks", "num_tensors", "total_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_chunks: int
    num_tensors: int
    total_bytes: int
    def __init__(self, version: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_tensors: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class WeightMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: VersionHeader
    chunk: WeightChunk
    def __init__(self, header: _Optional[_Union[VersionHeader, _Mapping]] = ..., chunk: _Optional[_Union[WeightChunk, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("version", "step", "buffer_size", "buffer_capacity", "counters", "rejected", "staleness", "metrics", "subscribers", "max_staleness", "group_size")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class StalenessEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    buffer_size: int
    buffer_capacity: int
    counters: _containers.ScalarMap[str, int]
    rejected: _containers.ScalarMap[str, int]
    staleness: _containers.ScalarMap[int, int]
    metrics: _containers.ScalarMap[str, float]
    subscribers: int
    max_staleness: int
    group_size: int
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., buffer_size: _Optional[int] = ..., buffer_capacity: _Optional[int] = ..., counters: _Optional[_Mapping[str, int]] = ..., rejected: _Optional[_Mapping[str, int]] = ..., staleness: _Optional[_Mapping[int, int]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., subscribers: _Optional[int] = ..., max_staleness: _Optional[int] = ..., group_size: _Optional[int] = ...) -> None: ...
