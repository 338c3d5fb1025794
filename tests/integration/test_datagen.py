"""The data service end to end: registry imports -> PrepareDataset (a Ray job in the train environment) -> a
prepared dataset artifact with its report; and the precise refusals. Real Ray, S3 and gRPC."""

from __future__ import annotations

import json
import random

import grpc
import pytest

from services.gen.tunery.v1 import common_pb2 as pb
from services.sdk.client import TuneryClient

pytestmark = pytest.mark.integration
WORDS = "apple river stone cloud maple violet copper lantern meadow harbor falcon ember quartz willow".split()


@pytest.fixture
def client(data_client):
    return data_client


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = " ".join(rng.sample(WORDS, 4))
        rows.append({"instruction": f"Write one sentence about {topic} number {i}.",
                     "input": "", "output": f"The {topic} story {i} ends well {rng.randint(0, 10**6)}."})
    return rows


def succeeded(c: TuneryClient, job: pb.Job, timeout: float = 300) -> pb.Job:
    final = c.wait(job.id, timeout)
    assert final.state == pb.JOB_STATE_SUCCEEDED, (pb.JobState.Name(final.state), final.state_reason)
    return final


def imported(c: TuneryClient, path, name: str, model: bool = False) -> str:
    job = c.import_model(str(path), name) if model else c.import_dataset(str(path), name)
    return succeeded(c, job).outputs[0].uri


def test_prepare_end_to_end(client, tiny_model, tmp_path):
    rows = alpaca_rows(60)
    dup = dict(rows[5])
    dup["output"] = dup["output"] + "!"  # a near-duplicate of row 6
    rows.append(dup)
    rows.append(dict(rows[10]))  # an exact duplicate of row 11
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = imported(client, tiny_model, "base", model=True)
    raw = imported(client, path, "stories")
    final = succeeded(client, client.prepare_dataset(raw, model, holdout=0.2, seed=7))
    prepared = client.get_artifact(final.outputs[-1].uri)
    assert prepared.kind == pb.ARTIFACT_KIND_DATASET
    assert {f.path for f in prepared.files} == {"train.jsonl", "holdout.jsonl", "report.html", "report.json"}
    assert [p.uri for p in prepared.parents] == [raw, model]
    meta = dict(prepared.metadata)
    assert meta["stage"] == "prepared" and meta["source_format"] == "alpaca"
    report = client.dataset_report(prepared.id)
    assert report.num_input == 62 and report.num_duplicates == 2
    assert report.num_train + report.num_holdout == 60 and report.num_holdout == 12
    # held-out and train are disjoint, canonical chat messages
    train = [json.loads(l) for l in client.download(prepared.id, "train.jsonl", tmp_path / "t.jsonl").read_text().splitlines()]
    hold = [json.loads(l) for l in client.download(prepared.id, "holdout.jsonl", tmp_path / "h.jsonl").read_text().splitlines()]
    assert not {e["id"] for e in train} & {e["id"] for e in hold}
    assert train[0]["messages"][-1]["role"] == "assistant"
    html = client.download(prepared.id, "report.html", tmp_path / "r.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "&lt;|im_start|&gt;assistant" in html  # escaped, rendered
    # the same input and spec give the same artifact (nothing new uploaded)
    again = succeeded(client, client.prepare_dataset(raw, model, holdout=0.2, seed=7))
    assert again.outputs[-1].uri == final.outputs[-1].uri and again.latest_metrics["bytes_uploaded"] == 0


def test_prepare_reports_line_numbered_errors(client, tiny_model, tmp_path):
    lines = [json.dumps(r) for r in alpaca_rows(10)]
    lines[6] = lines[6][:25]  # truncated JSON on line 7
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    model = imported(client, tiny_model, "base", model=True)
    raw = imported(client, path, "broken")
    final = client.wait(client.prepare_dataset(raw, model).id, 300)
    assert final.state == pb.JOB_STATE_FAILED
    assert "broken.jsonl:7" in final.state_reason, final.state_reason
    # the report of the failure is a complete artifact; no prepared dataset exists
    [report] = list(client.list_artifacts(kind=pb.ARTIFACT_KIND_REPORT))
    assert client.dataset_report(report.id).num_errors >= 1
    prepared = [a for a in client.list_artifacts(kind=pb.ARTIFACT_KIND_DATASET) if dict(a.metadata)["stage"] != "raw"]
    assert prepared == []


def test_prepare_refuses_bad_requests(client, tiny_model, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in alpaca_rows(5)))
    model = imported(client, tiny_model, "base", model=True)
    raw = imported(client, path, "d")

    def status(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    assert status(lambda: client.prepare_dataset(model, model))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert status(lambda: client.prepare_dataset(raw, raw))[0] == grpc.StatusCode.FAILED_PRECONDITION
    code, text = status(lambda: client.prepare_dataset("dataset-gone-000000000000", model))
    assert code == grpc.StatusCode.NOT_FOUND
    code, text = status(lambda: client.prepare_dataset(raw, model, holdout=0.9))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "holdout_fraction" in text
    code, text = status(lambda: client.prepare_dataset(raw, ""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "spec.base_model" in text
    assert list(client.list_jobs(kind="datagen.prepare")) == []
