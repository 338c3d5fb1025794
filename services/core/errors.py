"""Typed domain errors. Service classes raise these; one server interceptor maps them to gRPC status codes.

Nothing here imports grpc: the mapping lives in services.core.server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# What an error may echo of a request. A value is shown up to ECHO_CHARS characters ("… (N chars)" after), a
# message up to MESSAGE_CHARS, a field violation's description up to DESCRIPTION_CHARS and at most VIOLATIONS of
# them: the status then fits the trailers a client accepts (grpc's 8 KiB soft / 16 KiB hard metadata limits; the
# message travels twice, as grpc-message and inside grpc-status-details-bin), so a long bad value still comes back
# as the INVALID_ARGUMENT it is, not as RESOURCE_EXHAUSTED. Logs cap the same way (services.core.logs).
ECHO_CHARS = 120
MESSAGE_CHARS = 1500
DESCRIPTION_CHARS = 300
VIOLATIONS = 10
_LONG_RUN = re.compile(r"\S{%d,}" % (ECHO_CHARS + 40))


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    """`text` with every unbroken run longer than ECHO_CHARS + 40 characters (an echoed value: a path, a name, a
    token) cut to its first ECHO_CHARS, then the whole cut to `limit`, each cut saying how long it was."""
    text = _LONG_RUN.sub(lambda m: f"{m.group(0)[:ECHO_CHARS]}… ({len(m.group(0)):,} chars)", text)
    if len(text) > limit:
        text = f"{text[:limit - 24]}… ({len(text):,} chars)"
    return text


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
        self.message = shorten(self.message)
        more = len(self.violations) - VIOLATIONS
        self.violations = [FieldViolation(shorten(v.field, ECHO_CHARS + 40), shorten(v.description, DESCRIPTION_CHARS))
                           for v in self.violations[:VIOLATIONS]]
        if more > 0:
            self.message = shorten(f"{self.message} (and {more} more problems)")
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


class PermissionDenied(TuneryError):
    """The caller is known, but what it asks for is not theirs to have (a server path outside the import roots)."""

    code = "PERMISSION_DENIED"


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
