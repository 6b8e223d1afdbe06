from secureinfer.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CkksParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits", "depth", "security_bits")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    SECURITY_BITS_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    depth: int
    security_bits: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ..., depth: _Optional[int] = ..., security_bits: _Optional[int] = ...) -> None: ...

class HEModelMetadataResponse(_message.Message):
    __slots__ = ("model", "architecture_json", "depth", "recommended", "output_bound", "max_batch_pack", "input_encoding", "flood_sigma", "output_grid")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_JSON_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_PACK_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENCODING_FIELD_NUMBER: _ClassVar[int]
    FLOOD_SIGMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_GRID_FIELD_NUMBER: _ClassVar[int]
    model: _common_pb2.ModelMetadataResponse
    architecture_json: str
    depth: int
    recommended: CkksParameters
    output_bound: float
    max_batch_pack: int
    input_encoding: str
    flood_sigma: float
    output_grid: float
    def __init__(self, model: _Optional[_Union[_common_pb2.ModelMetadataResponse, _Mapping]] = ..., architecture_json: _Optional[str] = ..., depth: _Optional[int] = ..., recommended: _Optional[_Union[CkksParameters, _Mapping]] = ..., output_bound: _Optional[float] = ..., max_batch_pack: _Optional[int] = ..., input_encoding: _Optional[str] = ..., flood_sigma: _Optional[float] = ..., output_grid: _Optional[float] = ...) -> None: ...

class OpenSessionHeader(_message.Message):
    __slots__ = ("model_name", "model_version", "batch_pack", "scale_bits", "context_bytes", "galois_key_bytes", "galois_steps")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_PACK_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GALOIS_KEY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GALOIS_STEPS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    batch_pack: int
    scale_bits: int
    context_bytes: int
    galois_key_bytes: int
    galois_steps: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., batch_pack: _Optional[int] = ..., scale_bits: _Optional[int] = ..., context_bytes: _Optional[int] = ..., galois_key_bytes: _Optional[int] = ..., galois_steps: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenSessionChunk(_message.Message):
    __slots__ = ("header", "context", "galois_keys")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    GALOIS_KEYS_FIELD_NUMBER: _ClassVar[int]
    header: OpenSessionHeader
    context: bytes
    galois_keys: bytes
    def __init__(self, header: _Optional[_Union[OpenSessionHeader, _Mapping]] = ..., context: _Optional[bytes] = ..., galois_keys: _Optional[bytes] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "context_fingerprint", "idle_timeout_s", "depth", "n_input_ciphertexts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    N_INPUT_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    context_fingerprint: str
    idle_timeout_s: float
    depth: int
    n_input_ciphertexts: int
    def __init__(self, session_id: _Optional[str] = ..., context_fingerprint: _Optional[str] = ..., idle_timeout_s: _Optional[float] = ..., depth: _Optional[int] = ..., n_input_ciphertexts: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class CiphertextChunk(_message.Message):
    __slots__ = ("index", "total_bytes", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    total_bytes: int
    data: _common_pb2.Tensor
    def __init__(self, index: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class HEInferHeader(_message.Message):
    __slots__ = ("session_id", "model_name", "request_id", "batch_size", "n_ciphertexts", "context_fingerprint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    N_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_name: str
    request_id: str
    batch_size: int
    n_ciphertexts: int
    context_fingerprint: str
    def __init__(self, session_id: _Optional[str] = ..., model_name: _Optional[str] = ..., request_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., n_ciphertexts: _Optional[int] = ..., context_fingerprint: _Optional[str] = ...) -> None: ...

class HEInferRequest(_message.Message):
    __slots__ = ("header", "ciphertext")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    header: HEInferHeader
    ciphertext: CiphertextChunk
    def __init__(self, header: _Optional[_Union[HEInferHeader, _Mapping]] = ..., ciphertext: _Optional[_Union[CiphertextChunk, _Mapping]] = ...) -> None: ...

class HEInferResult(_message.Message):
    __slots__ = ("request_id", "n_ciphertexts", "cost", "flood_sigma", "output_grid", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    N_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    FLOOD_SIGMA_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_GRID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    n_ciphertexts: int
    cost: _common_pb2.Cost
    flood_sigma: float
    output_grid: float
    stats: _containers.ScalarMap[str, float]
    def __init__(self, request_id: _Optional[str] = ..., n_ciphertexts: _Optional[int] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., flood_sigma: _Optional[float] = ..., output_grid: _Optional[float] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class HEInferResponse(_message.Message):
    __slots__ = ("ciphertext", "result")
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ciphertext: CiphertextChunk
    result: HEInferResult
    def __init__(self, ciphertext: _Optional[_Union[CiphertextChunk, _Mapping]] = ..., result: _Optional[_Union[HEInferResult, _Mapping]] = ...) -> None: ...
