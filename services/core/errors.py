"""Typed domain errors. Service classes raise these; one server interceptor maps them to gRPC status codes.

Nothing here imports grpc: the mapping lives in services.core.server.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class TuneryError(Exception):
    """Base class. `code` names the gRPC status the interceptor answers with."""

    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    code = "INTERNAL"

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(TuneryError):
    code = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, name: str, description: str) -> "InvalidArgument":
        return cls(f"{name}: {description}", [FieldViolation(name, description)])


class NotFound(TuneryError):
    code = "NOT_FOUND"


class AlreadyExists(TuneryError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(TuneryError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(TuneryError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(TuneryError):
    code = "UNAUTHENTICATED"


class Unimplemented(TuneryError):
    code = "UNIMPLEMENTED"


class Unavailable(TuneryError):
    code = "UNAVAILABLE"


class IntegrityError(TuneryError):
    """A stored object does not match its recorded sha256."""

    code = "DATA_LOSS"


def yaml_error(e: Exception, source: str) -> InvalidArgument:
    """A PyYAML error (duck-typed: problem, context and their marks) as INVALID_ARGUMENT with line and column."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    what = f"{problem} ({context})" if context else problem
    if mark is not None:
        return InvalidArgument(f"{source}: malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {what}")
    return InvalidArgument(f"{source}: malformed YAML: {what}")


def check(violations: list[FieldViolation]) -> None:
    """Raise one InvalidArgument naming every violation, or nothing."""
    if violations:
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(f"invalid request: {text}", violations)
