"""services.core.specs and the enum conversion: plain data (a converted request) into a typed spec, every problem
an INVALID_ARGUMENT naming its field in the request's own terms."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, field_validator

from services.core.convert import enum_name
from services.core.errors import InvalidArgument
from services.core.specs import OpenAIEndpointSpec, parse


class Inner(BaseModel):
    rank: int = Field(8, gt=0)

    @field_validator("rank", mode="before")
    @classmethod
    def _friendly(cls, v):
        if v == 0:
            raise ValueError("must be > 0 (got 0); 8-64 is usual")
        return v


class Outer(BaseModel):
    name: str
    inner: Inner = Field(default_factory=Inner)
    ratio: float = Field(0.1, le=0.5)


def test_every_wrong_field_is_named_below_the_prefix():
    with pytest.raises(InvalidArgument) as e:
        parse(Outer, {"inner": {"rank": 0}, "ratio": 0.9})
    fields = {v.field: v.description for v in e.value.violations}
    assert set(fields) == {"spec.name", "spec.inner.rank", "spec.ratio"}
    assert fields["spec.inner.rank"] == "must be > 0 (got 0); 8-64 is usual"  # a validator's sentence, as written
    assert "spec.ratio" in str(e.value) and "0.5" in fields["spec.ratio"]
    with pytest.raises(InvalidArgument, match=r"recipe\.name"):
        parse(Outer, {}, "recipe")
    assert parse(Outer, {"name": "x", "inner": {"rank": 4}}).inner.rank == 4


def test_an_enum_number_outside_the_enum_is_refused_by_field():
    names = {1: "drop", 2: "flag"}
    assert enum_name(names, 2, "spec.dedup_action") == "flag"
    with pytest.raises(InvalidArgument) as e:
        enum_name(names, 77, "spec.dedup_action")
    assert [v.field for v in e.value.violations] == ["spec.dedup_action"]
    assert "77 is not a known value" in str(e.value) and "1 (drop)" in str(e.value)


def test_endpoint_problem():
    assert OpenAIEndpointSpec(base_url="http://h:1/v1", model="m").problem() == ""
    assert OpenAIEndpointSpec(base_url="ftp://h", model="m").problem()
    assert OpenAIEndpointSpec(base_url="https://h", model="").problem()
