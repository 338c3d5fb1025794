"""Imports from anywhere, end to end (real gRPC registry, real Ray jobs, the session's S3 server): files uploaded
from the client (the registry's import roots hold none of them), a broken upload resumed, s3:// objects and
prefixes in another bucket, http(s):// datasets with their size cap, and the refusals (server paths outside the
roots, link-local hosts, the hub without network)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from functools import partial
from pathlib import Path

import grpc
import pytest

from services.cli.stack import health
from services.core.store import S3ObjectStore
from services.gen.tunery.v1 import common_pb2 as pb
from services.gen.tunery.v1 import registry_pb2
from services.registry.servicer import build as build_registry
from services.sdk.client import TuneryClient
from tests.modeldirs import make_model
from tests.servers import wait_for
from tests.session import TOKEN, rpc_error, succeeded

pytestmark = pytest.mark.integration


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def remote(servers, settings, tmp_path):
    """A registry whose only import root is a folder of its own: the client's files are not the server's."""
    (tmp_path / "server-root").mkdir()
    port = servers.start(settings.model_copy(update={"import_roots": str(tmp_path / "server-root"),
                                                     "import_url_max_bytes": 4096}), build_registry)
    wait_for(lambda: health(port) == "SERVING", 30, what="registry SERVING")
    c = TuneryClient(f"127.0.0.1:{port}", TOKEN)
    yield c
    c.close()


def rows(n: int) -> str:
    return "\n".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) for i in range(n)) + "\n"


def test_local_files_are_uploaded_and_imported(remote, tmp_path):
    data = tmp_path / "client" / "train.jsonl"
    data.parent.mkdir()
    data.write_text(rows(30))
    model = make_model(tmp_path / "client" / "model")
    # as server paths they are refused: outside the registry's roots
    code, details = rpc_error(lambda: remote.import_dataset(str(data), "d", upload=False))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "import roots" in details and "upload" in details
    seen = []
    art = remote.get_artifact(succeeded(remote, remote.import_dataset(
        str(data), "numbers", progress=lambda d, t: seen.append((d, t)))).outputs[0].uri)
    assert [(f.path, f.sha256) for f in art.files] == [("train.jsonl", sha(data))]
    meta = dict(art.metadata)
    assert meta["source"].startswith("upload://") and meta["uploaded_from"] == str(data)
    assert seen[-1] == (data.stat().st_size, data.stat().st_size)
    m = remote.get_artifact(succeeded(remote, remote.import_model(str(model), "tiny")).outputs[0].uri)
    assert {f.path: f.sha256 for f in m.files} == {p.relative_to(model).as_posix(): sha(p)
                                                   for p in model.rglob("*") if p.is_file()}
    assert dict(m.metadata)["architecture"] == "LlamaForCausalLM"
    # a blob already stored is not sent again
    for p in model.rglob("*"):
        if p.is_file():
            st = remote.call(remote.registry.StatUpload, registry_pb2.StatUploadRequest(
                sha256=sha(p), size=p.stat().st_size))
            assert st.stored and st.received_bytes == p.stat().st_size
    # an upload that names a file never sent is refused before anything is queued
    listing = json.dumps({"tunery_upload": 1, "files": [{"path": "x.jsonl", "sha256": "0" * 64, "size": 3}]})
    (tmp_path / "listing.json").write_text(listing)
    uri = remote.upload(tmp_path / "listing.json")  # a listing of the listing file: fine; name the inner one:
    inner = hashlib.sha256(listing.encode()).hexdigest()
    code, details = rpc_error(lambda: remote.import_dataset(f"upload://{inner}", "d"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "x.jsonl" in details and "not uploaded" in details
    assert uri.startswith("upload://")


def test_a_broken_upload_resumes_where_it_stopped(remote, tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"instruction": "x" * 200, "output": "y"}) + "\n"
    path.write_text(line * (20 * 1024 * 1024 // len(line)))  # ~20 MiB: two whole 8 MiB parts and a tail
    digest, size = sha(path), path.stat().st_size

    def kept() -> registry_pb2.UploadStatus:
        return remote.call(remote.registry.StatUpload, registry_pb2.StatUploadRequest(sha256=digest, size=size))

    def breaking():
        with open(path, "rb") as f:
            sent = 0
            while data := f.read(1 << 20):
                yield registry_pb2.UploadChunk(sha256=digest, size=size, offset=sent, data=data)
                sent += len(data)
                if sent >= 17 * (1 << 20):
                    # the server has written two whole parts (however loaded the machine), then the line drops
                    wait_for(lambda: kept().received_bytes == 16 * (1 << 20), 120, what="two parts kept")
                    raise ConnectionError("the laptop's Wi-Fi drops")

    with pytest.raises(grpc.RpcError):
        remote.registry.UploadFile(breaking(), metadata=remote.metadata, timeout=300)
    st = kept()
    assert not st.stored and st.received_bytes == 16 * (1 << 20)  # the partial third part is not kept
    resumed = []
    final = remote.upload_file(path, digest, size, progress=lambda d, t: resumed.append(d))
    assert final.stored and resumed[0] == 16 * (1 << 20)  # it started from the kept bytes
    art = remote.get_artifact(succeeded(remote, remote.import_dataset(str(path), "big")).outputs[0].uri)
    assert art.files[0].sha256 == digest and art.files[0].size == size


def test_s3_objects_and_prefixes_in_another_bucket(remote, settings, tmp_path):
    other = S3ObjectStore(settings.model_copy(update={"store_url": "s3://customer-data"}), "customer-data")
    data = tmp_path / "train.jsonl"
    data.write_text(rows(12))
    other.put_file("exports/train.jsonl", data)
    model = make_model(tmp_path / "model")
    for p in model.rglob("*"):
        if p.is_file():
            other.put_file(f"models/tiny/{p.relative_to(model).as_posix()}", p)
    d = remote.get_artifact(succeeded(remote, remote.import_dataset(
        "s3://customer-data/exports/train.jsonl", "from-s3")).outputs[0].uri)
    assert [(f.path, f.sha256) for f in d.files] == [("train.jsonl", sha(data))]
    m = remote.get_artifact(succeeded(remote, remote.import_model("s3://customer-data/models/tiny/", "tiny-s3"))
                            .outputs[0].uri)
    assert {f.path: f.sha256 for f in m.files} == {p.relative_to(model).as_posix(): sha(p)
                                                   for p in model.rglob("*") if p.is_file()}
    final = remote.wait(remote.import_dataset("s3://no-such-bucket/train.jsonl", "nope").id, 120)
    assert final.state == pb.JOB_STATE_FAILED and "does not exist" in final.state_reason


def test_http_datasets_with_a_size_cap_and_the_refusals(remote, tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "small.jsonl").write_text(rows(5))
    (tmp_path / "www" / "large.jsonl").write_text(rows(200))  # above the registry's 4096-byte cap
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        art = remote.get_artifact(succeeded(remote, remote.import_dataset(f"{base}/small.jsonl", "web"))
                                  .outputs[0].uri)
        assert art.files[0].sha256 == sha(tmp_path / "www" / "small.jsonl")
        big = remote.wait(remote.import_dataset(f"{base}/large.jsonl", "web-large").id, 120)
        assert big.state == pb.JOB_STATE_FAILED and "import_url_max_bytes (4,096 bytes)" in big.state_reason
        gone = remote.wait(remote.import_dataset(f"{base}/gone.jsonl", "web-gone").id, 120)
        assert gone.state == pb.JOB_STATE_FAILED and "HTTP 404" in gone.state_reason
    finally:
        server.shutdown()
    for call, code, words in [
        (lambda: remote.import_dataset("http://169.254.169.254/latest/meta-data.jsonl", "m"),
         grpc.StatusCode.PERMISSION_DENIED, "link-local"),
        (lambda: remote.import_dataset(f"{base}/page.html", "m"), grpc.StatusCode.INVALID_ARGUMENT, ".jsonl"),
        (lambda: remote.import_model(f"{base}/model/", "m"), grpc.StatusCode.INVALID_ARGUMENT, "cannot come over"),
        (lambda: remote.import_model("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "m"),
         grpc.StatusCode.FAILED_PRECONDITION, "no network"),
        (lambda: remote.import_model("/proc/self", "m", upload=False), grpc.StatusCode.PERMISSION_DENIED, "roots"),
        (lambda: remote.import_dataset("ftp://host/x.jsonl", "m"), grpc.StatusCode.INVALID_ARGUMENT, "use a file"),
    ]:
        got, details = rpc_error(call)
        assert got == code and words in details, (words, got, details)
