"""DatagenService's validation and conversions, over a fake runner and a local store."""

import asyncio

import pytest

from services.core.artifacts import ArtifactRef, ArtifactStore
from services.core.jobs import SubmitOptions
from services.core.specs import parse
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound
from services.core.store import LocalObjectStore
from services.datagen.service import DatagenService, DatagenSettings
from services.datagen.spec import PrepareDatasetSpec, PrepareOptions
from services.datagen.servicer import prepare_options, report_to_pb
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import datagen_pb2
from tests.fakes import FakeRunner


@pytest.fixture
def env(tmp_path):
    store = ArtifactStore(LocalObjectStore(tmp_path / "s"), "p")
    runner = FakeRunner(store)
    svc = DatagenService(store, runner, DatagenSettings(project="p", port=0))

    def art(kind, name, **meta):
        w = store.writer(kind, name)
        w.add_bytes(name.encode(), "f.json")
        return w.commit(meta)[0].ref()

    raw = art("dataset", "raw", stage="raw")
    model = art("model", "m", is_causal_lm=True, has_chat_template=True)
    return svc, runner, art, raw, model


def prepare(svc, dataset, base, name, options, **submit):
    """A request as the servicer hands it over: the typed spec, its options parsed the way the servicer parses
    them (errors name spec.<option>)."""
    spec = PrepareDatasetSpec(dataset=ArtifactRef(uri=dataset.uri, sha256=dataset.sha256),
                              base_model=ArtifactRef(uri=base.uri, sha256=base.sha256), name=name,
                              options=parse(PrepareOptions, options))
    return asyncio.run(svc.prepare(spec, SubmitOptions(**submit)))


def test_valid_request_is_queued_in_the_train_role(env):
    svc, runner, _, raw, model = env
    job = prepare(svc, raw, model, "", {"holdout_fraction": 0.2, "dedup": "exact"}, key="prep-1")
    req = runner.submitted[0]
    assert job.id == "prep-1" and req.kind == "datagen.prepare" and req.role == "train"
    assert req.spec["name"] == "raw-prepared" and req.spec["options"]["holdout_fraction"] == 0.2
    assert req.spec["dataset"]["sha256"] == raw.sha256  # the job gets pinned references


@pytest.mark.parametrize("meta,err,text", [
    ({"is_causal_lm": False, "has_chat_template": True}, FailedPrecondition, "not a causal LM"),
    ({"is_causal_lm": True, "has_chat_template": False}, FailedPrecondition, "no chat template"),
])
def test_base_model_must_fit(env, meta, err, text):
    svc, runner, art, raw, _ = env
    with pytest.raises(err, match=text):
        prepare(svc, raw, art("model", "other", **meta), "", {})
    assert runner.submitted == []


def test_refusals(env):
    svc, runner, art, raw, model = env
    with pytest.raises(FailedPrecondition, match="not a dataset"):
        prepare(svc, model, model, "", {})
    with pytest.raises(FailedPrecondition, match="already prepared"):
        prepare(svc, art("dataset", "done", stage="prepared"), model, "", {})
    with pytest.raises(NotFound):
        prepare(svc, pb.ArtifactRef(uri="dataset-x-000000000000"), model, "", {})
    with pytest.raises(InvalidArgument) as e:
        prepare(svc, raw, model, "", {"holdout_fraction": 0.9, "dedup": "fuzzy"})
    assert {v.field for v in e.value.violations} == {"spec.holdout_fraction", "spec.dedup"}
    with pytest.raises(InvalidArgument, match="spec.name"):
        prepare(svc, raw, model, "../x", {})
    assert runner.submitted == []


def test_proto_options_only_carry_what_was_set():
    s = datagen_pb2.PrepareDatasetSpec(holdout_fraction=0.25, dedup=datagen_pb2.DEDUP_MODE_EXACT)
    assert prepare_options(s) == {"format": "auto", "holdout_fraction": 0.25, "dedup": "exact"}


@pytest.mark.parametrize("field,value", [("dedup", 77), ("format", 99), ("dedup_action", 5)])
def test_an_enum_number_outside_the_enum_is_refused_not_defaulted(field, value):
    s = datagen_pb2.PrepareDatasetSpec()
    setattr(s, field, value)
    with pytest.raises(InvalidArgument) as e:
        prepare_options(s)
    assert [v.field for v in e.value.violations] == [f"spec.{field}"]


def test_report_conversion():
    r = {"detected_format": "chat", "counts": {"input": 10, "train": 7, "holdout": 1, "exact_duplicates": 1,
         "near_duplicates": 1, "errors": 0, "warnings": 2},
         "problems": [{"severity": "warning", "file": "a.jsonl", "line": 3, "field": "messages", "message": "long"}]}
    out = report_to_pb(pb.ArtifactRef(uri="tunery://p/x"), r)
    assert (out.num_input, out.num_train, out.num_holdout, out.num_duplicates) == (10, 7, 1, 2)
    assert out.detected_format == pb.DATASET_FORMAT_CHAT and out.issues[0].line == 3
