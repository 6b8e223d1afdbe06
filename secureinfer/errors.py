"""Exception tree of secureinfer.

Every error a user, a model file or the network can cause is one of these, never a bare
``assert``. Each class carries the gRPC status code it maps to (``grpc_code``, a name of
``grpc.StatusCode``) so that the party server and the client SDK translate errors in one
place and in both directions.

    SecureInferError
    ├── ConfigError                 bad topology file, flag or environment variable
    ├── InvalidArgumentError        a request or model the server cannot accept
    │   ├── ShapeError              wrong shape or dtype of an input
    │   ├── RangeError              a value outside the fixed-point range
    │   └── UnsupportedModelError   layers the engine cannot run (lists all of them)
    ├── NotFoundError               unknown model, version or client
    ├── AlreadyExistsError          a deploy that would silently replace a model
    ├── PermissionDeniedError       valid certificate, wrong role
    ├── UnauthenticatedError        no or invalid certificate
    ├── ResourceExhaustedError      a limit was reached (rate, size, concurrency)
    │   └── BudgetExhaustedError    a DP request that would exceed the client's budget
    ├── IntegrityError              a tampered ciphertext, signature or certificate
    ├── ProtocolError               peers disagree or a message is malformed
    └── TransportError              a peer cannot be reached
        ├── PeerUnavailableError    a party or the dealer is down
        └── DeadlineExceededError   a request ran past its deadline
"""

from __future__ import annotations

__all__ = [
    "ERROR_CLASS_KEY",
    "AlreadyExistsError",
    "BudgetExhaustedError",
    "ConfigError",
    "DeadlineExceededError",
    "IntegrityError",
    "InvalidArgumentError",
    "NotFoundError",
    "PeerUnavailableError",
    "PermissionDeniedError",
    "ProtocolError",
    "RangeError",
    "ResourceExhaustedError",
    "SecureInferError",
    "ShapeError",
    "TransportError",
    "UnauthenticatedError",
    "UnsupportedModelError",
    "error_from_status",
]


class SecureInferError(Exception):
    """Base class of every error raised by secureinfer."""

    grpc_code: str = "INTERNAL"


class ConfigError(SecureInferError):
    """A topology file, flag or environment variable is missing or wrong."""

    grpc_code = "FAILED_PRECONDITION"


class InvalidArgumentError(SecureInferError):
    """A request or a model that the server cannot accept as given."""

    grpc_code = "INVALID_ARGUMENT"


class ShapeError(InvalidArgumentError):
    """An input has the wrong shape or dtype; the message names the expected one."""


class RangeError(InvalidArgumentError):
    """A value lies outside the range its fixed-point encoding can represent."""


class UnsupportedModelError(InvalidArgumentError):
    """The model contains layers the engine cannot run.

    ``problems`` lists every unsupported node, not only the first one found.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        if self.problems:
            message = message + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class NotFoundError(SecureInferError):
    """An unknown model, version, session or client."""

    grpc_code = "NOT_FOUND"


class AlreadyExistsError(SecureInferError):
    """A deploy would replace an existing model without an explicit ``replace``."""

    grpc_code = "ALREADY_EXISTS"


class PermissionDeniedError(SecureInferError):
    """The caller's certificate is valid but its role may not call this RPC."""

    grpc_code = "PERMISSION_DENIED"


class UnauthenticatedError(SecureInferError):
    """The caller presented no certificate, or one the CA did not sign."""

    grpc_code = "UNAUTHENTICATED"


class ResourceExhaustedError(SecureInferError):
    """A limit was reached: a rate limit, a size cap, too many concurrent requests."""

    grpc_code = "RESOURCE_EXHAUSTED"


class BudgetExhaustedError(ResourceExhaustedError):
    """A differentially private request would exceed the client's privacy budget."""

    grpc_code = "RESOURCE_EXHAUSTED"


class IntegrityError(SecureInferError):
    """Authenticated data failed its check: ciphertext, signature or commitment."""

    grpc_code = "DATA_LOSS"


class ProtocolError(SecureInferError):
    """Parties disagree on a protocol step, or a message is malformed."""

    grpc_code = "INTERNAL"


class TransportError(SecureInferError):
    """A message could not be delivered."""

    grpc_code = "UNAVAILABLE"


class PeerUnavailableError(TransportError):
    """A party or the dealer cannot be reached; the message names it."""

    grpc_code = "UNAVAILABLE"


class DeadlineExceededError(TransportError):
    """The request ran past its deadline; the message names who was waited on."""

    grpc_code = "DEADLINE_EXCEEDED"


_BY_CODE: dict[str, type[SecureInferError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "DATA_LOSS": IntegrityError,
    "UNAVAILABLE": PeerUnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "FAILED_PRECONDITION": ConfigError,
}


#: trailing-metadata key under which a server names the exception class it raised, so the
#: client can rebuild the same class where one status code covers several (a DP budget
#: versus a rate limit are both RESOURCE_EXHAUSTED)
ERROR_CLASS_KEY = "secureinfer-error-class"


def error_from_status(code_name: str, message: str, *, class_name: str | None = None) -> SecureInferError:
    """Map a gRPC status code name (e.g. ``"UNAVAILABLE"``) back to an exception.

    ``class_name`` (the server's :data:`ERROR_CLASS_KEY`) selects a subclass of this
    module when it maps to the same status code; anything else falls back to the code.
    """
    named = _BY_NAME.get(class_name or "")
    if named is not None and named.grpc_code == code_name:
        return named(message)
    cls = _BY_CODE.get(code_name, SecureInferError)
    return cls(message)


_BY_NAME: dict[str, type[SecureInferError]] = {
    c.__name__: c for c in list(globals().values())
    if isinstance(c, type) and issubclass(c, SecureInferError) and c.__module__ == __name__
}
