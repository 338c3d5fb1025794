"""Synthetic generation end to end: the tiny fixture model as a teacher, run by vLLM (CPU build) inside a Ray job
in the serve environment, through the filters, into a raw dataset artifact with lineage."""

from __future__ import annotations

import json

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from tests.servers import REPO

pytestmark = pytest.mark.integration
SMOKE = (REPO / "services" / "datagen" / "recipes" / "smoke.yaml").read_text()


@pytest.fixture
def client(data_client):
    return data_client


def test_generate_with_the_tiny_teacher(client, tiny_model, tmp_path):
    job = client.import_model(str(tiny_model), "teacher")
    teacher = client.wait(job.id, 120).outputs[0].uri
    final = client.wait(client.generate_dataset(SMOKE, teacher=teacher, name="smoke-synth").id, 600)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.state_reason
    art = client.get_artifact(final.outputs[-1].uri)
    meta = dict(art.metadata)
    assert meta["stage"] == "raw" and meta["synthetic"] is True and meta["teacher"] == teacher
    assert [p.uri for p in art.parents] == [teacher]  # lineage: the teacher
    assert meta["kept"] == meta["requested"] == 12
    rows = [json.loads(l) for l in client.download(art.id, "generated.jsonl", tmp_path / "g.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["instruction"] and r["output"] for r in rows)
    assert len({r["output"] for r in rows}) == 12  # the dedup filter kept no duplicates
    # the progress events counted generated, kept and rejected-by-reason
    metrics = [ev for ev in client.watch(final.id) if ev.type == pb.EVENT_TYPE_METRICS]
    last = metrics[-1].metrics
    assert last["kept"] == 12 and last["generated"] == last["kept"] + last["rejected"]
    assert art.metrics["examples_per_s"] > 0
    # same recipe, same seeds: the same examples
    again = client.wait(client.generate_dataset(SMOKE, teacher=teacher, name="smoke-synth").id, 600)
    assert again.outputs[-1].uri == final.outputs[-1].uri


def test_generate_refuses_bad_requests(client, tiny_model):
    teacher = client.wait(client.import_model(str(tiny_model), "teacher").id, 120).outputs[0].uri

    def status(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    code, text = status(lambda: client.generate_dataset("behaviour: [unclosed", teacher=teacher))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "line 1" in text
    code, text = status(lambda: client.generate_dataset(SMOKE.replace("temperature: 1.0", "temperature: 7"), teacher=teacher))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "recipe.sampling.temperature" in text
    code, text = status(lambda: client.generate_dataset(SMOKE))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.teacher" in text
    code, _ = status(lambda: client.generate_dataset(SMOKE, teacher="model-none-000000000000"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert list(client.list_jobs(kind="datagen.generate")) == []
