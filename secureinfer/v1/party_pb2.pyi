from secureinfer.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "request_id", "input", "outputs", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    request_id: str
    input: _common_pb2.Tensor
    outputs: _containers.RepeatedScalarFieldContainer[str]
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., input: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., outputs: _Optional[_Iterable[str]] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "request_id", "outputs", "cost", "party_id", "info")
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    request_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    cost: _common_pb2.Cost
    party_id: int
    info: _containers.ScalarMap[str, str]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., party_id: _Optional[int] = ..., info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeployHeader(_message.Message):
    __slots__ = ("name", "version", "deployment_id", "replace", "graph", "total_bytes", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    deployment_id: str
    replace: bool
    graph: bytes
    total_bytes: int
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., deployment_id: _Optional[str] = ..., replace: _Optional[bool] = ..., graph: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DeployChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DeployHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DeployHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightShares(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.NamedTensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_common_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class DeployResponse(_message.Message):
    __slots__ = ("name", "version", "deployment_id", "cost")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    deployment_id: str
    cost: _common_pb2.Cost
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., deployment_id: _Optional[str] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RemoveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "deployment_id", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    deployment_id: str
    created: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., deployment_id: _Optional[str] = ..., created: _Optional[str] = ...) -> None: ...

class PeerMessage(_message.Message):
    __slots__ = ("session_id", "step", "sender", "chunk_index", "chunk_count", "payload")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    sender: int
    chunk_index: int
    chunk_count: int
    payload: bytes
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., sender: _Optional[int] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PeerAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortNotice(_message.Message):
    __slots__ = ("session_id", "sender", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sender: int
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., sender: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "request_id", "layer", "reveal_distance", "certificate", "watermark_seed", "watermark_nonce")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    REVEAL_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_SEED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_NONCE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    request_id: str
    layer: str
    reveal_distance: bool
    certificate: bytes
    watermark_seed: bytes
    watermark_nonce: bytes
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., request_id: _Optional[str] = ..., layer: _Optional[str] = ..., reveal_distance: _Optional[bool] = ..., certificate: _Optional[bytes] = ..., watermark_seed: _Optional[bytes] = ..., watermark_nonce: _Optional[bytes] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("verdict", "distance", "party_id", "cost")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    PARTY_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    verdict: _common_pb2.Tensor
    distance: _common_pb2.Tensor
    party_id: int
    cost: _common_pb2.Cost
    def __init__(self, verdict: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., distance: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., party_id: _Optional[int] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...
