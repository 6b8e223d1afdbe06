from secureinfer.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterModelRequest(_message.Message):
    __slots__ = ("deployment_id", "graph", "party_id", "n_parties", "nonce")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    N_PARTIES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    graph: bytes
    party_id: int
    n_parties: int
    nonce: bytes
    def __init__(self, deployment_id: _Optional[str] = ..., graph: _Optional[bytes] = ..., party_id: _Optional[int] = ..., n_parties: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("graph_sha256", "model_seed", "nonce")
    GRAPH_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SEED_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    graph_sha256: bytes
    model_seed: bytes
    nonce: bytes
    def __init__(self, graph_sha256: _Optional[bytes] = ..., model_seed: _Optional[bytes] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("deployment_id", "session_id", "party_id", "batch", "purpose")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    session_id: str
    party_id: int
    batch: int
    purpose: str
    def __init__(self, deployment_id: _Optional[str] = ..., session_id: _Optional[str] = ..., party_id: _Optional[int] = ..., batch: _Optional[int] = ..., purpose: _Optional[str] = ...) -> None: ...

class MaterialChunk(_message.Message):
    __slots__ = ("chunk_index", "chunk_count", "data", "set_id")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SET_ID_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    chunk_count: int
    data: bytes
    set_id: str
    def __init__(self, chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., data: _Optional[bytes] = ..., set_id: _Optional[str] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("tensors", "blobs")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    class BlobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.MessageMap[str, _common_pb2.Tensor]
    blobs: _containers.ScalarMap[str, bytes]
    def __init__(self, tensors: _Optional[_Mapping[str, _common_pb2.Tensor]] = ..., blobs: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("deployment_id",)
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    def __init__(self, deployment_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("deployment_id",)
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    def __init__(self, deployment_id: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("counters",)
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    counters: _containers.ScalarMap[str, int]
    def __init__(self, counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("deployment_id", "party_id", "batch", "purpose", "held", "confirm_only", "depth")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_ONLY_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    party_id: int
    batch: int
    purpose: str
    held: _containers.RepeatedScalarFieldContainer[str]
    confirm_only: bool
    depth: int
    def __init__(self, deployment_id: _Optional[str] = ..., party_id: _Optional[int] = ..., batch: _Optional[int] = ..., purpose: _Optional[str] = ..., held: _Optional[_Iterable[str]] = ..., confirm_only: _Optional[bool] = ..., depth: _Optional[int] = ...) -> None: ...

class BindRequest(_message.Message):
    __slots__ = ("deployment_id", "session_id", "party_id", "batch", "purpose")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    session_id: str
    party_id: int
    batch: int
    purpose: str
    def __init__(self, deployment_id: _Optional[str] = ..., session_id: _Optional[str] = ..., party_id: _Optional[int] = ..., batch: _Optional[int] = ..., purpose: _Optional[str] = ...) -> None: ...

class BindResponse(_message.Message):
    __slots__ = ("set_id",)
    SET_ID_FIELD_NUMBER: _ClassVar[int]
    set_id: str
    def __init__(self, set_id: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("deployment_id", "party_id", "batch", "purpose", "max_sets")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    MAX_SETS_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    party_id: int
    batch: int
    purpose: str
    max_sets: int
    def __init__(self, deployment_id: _Optional[str] = ..., party_id: _Optional[int] = ..., batch: _Optional[int] = ..., purpose: _Optional[str] = ..., max_sets: _Optional[int] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("set_ids", "void_ids")
    SET_IDS_FIELD_NUMBER: _ClassVar[int]
    VOID_IDS_FIELD_NUMBER: _ClassVar[int]
    set_ids: _containers.RepeatedScalarFieldContainer[str]
    void_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, set_ids: _Optional[_Iterable[str]] = ..., void_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForgetRequest(_message.Message):
    __slots__ = ("party_id",)
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    party_id: int
    def __init__(self, party_id: _Optional[int] = ...) -> None: ...

class ForgetResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...
