"""What an error or a log line echoes of a request is capped (#11.3), and enum numbers outside their enum are found
wherever they sit in a request."""

from __future__ import annotations

import json
import logging

import pytest

from services.core.convert import unknown_enums
from services.core.errors import (
    DESCRIPTION_CHARS,
    ECHO_CHARS,
    MESSAGE_CHARS,
    VIOLATIONS,
    FieldViolation,
    InvalidArgument,
    shorten,
)
from services.core.logs import LOG_CHARS, JsonFormatter
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import datagen_pb2

pytestmark = pytest.mark.unit


def test_a_long_value_is_cut_and_says_how_long_it_was():
    text = shorten(f"spec.name: {'x' * 50_000!r} must match [a-z0-9-]+")
    assert text.startswith("spec.name: 'xxx") and "… (50,002 chars)" in text and text.endswith("[a-z0-9-]+")
    assert len(text) < ECHO_CHARS + 80
    assert shorten("short and sweet") == "short and sweet"
    words = shorten("word " * 2000)  # no single long value: the whole message is cut
    assert len(words) <= MESSAGE_CHARS and words.endswith("(10,000 chars)")


def test_an_error_caps_its_message_and_its_violations():
    e = InvalidArgument.field("spec.source", "a" * 100_000)
    assert len(e.message) < 300 and len(e.violations[0].description) <= DESCRIPTION_CHARS
    many = InvalidArgument("bad", [FieldViolation(f"f{i}", "wrong") for i in range(25)])
    assert len(many.violations) == VIOLATIONS and many.message == "bad (and 15 more problems)"
    assert str(many) == many.message


def test_a_log_line_never_floods(capsys):
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "value %s", ("v" * 720_000,), None)
    line = JsonFormatter().format(record)
    assert len(line) < LOG_CHARS + 200 and "(720,000 chars)" in json.loads(line)["msg"]


def test_unknown_enum_numbers_are_found_with_their_paths():
    req = datagen_pb2.PrepareDatasetRequest(spec=datagen_pb2.PrepareDatasetSpec(dedup=77, format=99))
    found = {v.field: v.description for v in unknown_enums(req)}
    assert set(found) == {"spec.dedup", "spec.format"}
    assert found["spec.dedup"].startswith("77 is not a known DedupMode (known: DEDUP_MODE_UNSPECIFIED (0)")
    listed = pb.ListJobsRequest(states=[pb.JOB_STATE_RUNNING, 55])  # a repeated enum
    assert [v.field for v in unknown_enums(listed)] == ["states[1]"]
    assert unknown_enums(pb.ListJobsRequest(states=[pb.JOB_STATE_RUNNING])) == []
    assert unknown_enums(datagen_pb2.PrepareDatasetRequest()) == []
