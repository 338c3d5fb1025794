"""Typed specs: plain data in, a pydantic model out, every error an INVALID_ARGUMENT naming its field; and the spec
types more than one service uses.

    spec = parse(TrainingJobSpec, {"base_model": {...}, "lora": {"rank": 0}})
    # InvalidArgument: invalid request: spec.lora.rank: must be > 0 (got 0); 8-64 is usual
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from services.core.errors import FieldViolation, check

T = TypeVar("T", bound=BaseModel)


def violations(e: ValidationError, prefix: str = "spec") -> list[FieldViolation]:
    """pydantic's errors as field violations: the dotted path below `prefix`, and the message without pydantic's
    "Value error, " (a validator's own sentence reads as it was written)."""
    out = []
    for err in e.errors():
        path = ".".join(str(p) for p in err["loc"])
        out.append(FieldViolation(f"{prefix}.{path}" if path else prefix, err["msg"].removeprefix("Value error, ")))
    return out


def parse(model: type[T], data: Any, prefix: str = "spec") -> T:
    """`model` validated from `data`; InvalidArgument listing every field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        check(violations(e, prefix))
        raise  # unreachable: check raised


class OpenAIEndpointSpec(BaseModel):
    """An OpenAI-compatible server a job talks to (a teacher, an eval target); the key is read on the worker from
    the environment variable `api_key_env`, never sent."""

    base_url: str
    model: str
    api_key_env: str = ""

    def problem(self) -> str:
        """Why this endpoint cannot be used, or ""."""
        if not self.base_url.startswith(("http://", "https://")) or not self.model:
            return "needs an http(s) base_url and a model name"
        return ""
