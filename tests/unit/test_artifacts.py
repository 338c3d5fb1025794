import pytest

from services.core.artifacts import ArtifactRef, ArtifactStore
from services.core.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from services.core.store import LocalObjectStore


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(LocalObjectStore(tmp_path / "s"), "proj")


def model(store, tmp_path, name="m", content=b"weights"):
    d = tmp_path / f"src-{name}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(content)
    w = store.writer("model", name, job_id="job-1")
    list(w.add_dir(d))
    return w


def test_commit_writes_manifest_last_and_reimport_uploads_nothing(store, tmp_path):
    w = model(store, tmp_path)
    assert store.list()[0] == []  # blobs are up, but nothing is listed before the manifest
    m, created = w.commit({"form": "base"})
    assert created and w.bytes_uploaded == len(b"weights") + 2
    assert m.id.startswith("model-m-") and m.uri == f"tunery://proj/{m.id}"
    assert [f.path for f in m.files] == ["config.json", "model.safetensors"]
    w2 = model(store, tmp_path)
    m2, created2 = w2.commit({"form": "base"})
    assert not created2 and m2.id == m.id and w2.bytes_uploaded == 0


def test_different_content_is_a_different_artifact(store, tmp_path):
    a, _ = model(store, tmp_path, content=b"v1").commit()
    b, _ = model(store, tmp_path, content=b"v2").commit()
    assert a.id != b.id
    assert [x.id for x in store.list("model")[0]] == sorted([a.id, b.id])


def test_list_filters_and_pages(store, tmp_path):
    ids = [model(store, tmp_path, name=f"n{i}", content=bytes([i])).commit()[0].id for i in range(5)]
    page, nxt = store.list("model", limit=2)
    assert [m.id for m in page] == sorted(ids)[:2] and nxt == page[-1].id
    rest = []
    while nxt:
        page, nxt = store.list("model", after=nxt, limit=2)
        rest += [m.id for m in page]
    assert rest == sorted(ids)[2:]
    assert [m.name for m in store.list("model", "n3")[0]] == ["n3"]
    assert store.list("dataset")[0] == []


def test_parents_lineage_and_guarded_delete(store, tmp_path):
    base, _ = model(store, tmp_path).commit()
    w = store.writer("adapter", "a", parents=[base.ref()])
    w.add_bytes(b"{}", "adapter_config.json")
    child, _ = w.commit()
    assert [m.id for m in store.lineage(child.id)] == [child.id, base.id]
    assert [m.id for m in store.lineage(child.id, max_depth=1)] == [child.id, base.id]
    with pytest.raises(FailedPrecondition, match=child.id):
        store.delete(base.id)
    store.delete(child.id)
    store.delete(base.id)
    with pytest.raises(NotFound):
        store.get(base.id)


def test_missing_or_mismatched_parent_is_refused(store, tmp_path):
    base, _ = model(store, tmp_path).commit()
    w = store.writer("adapter", "a", parents=[ArtifactRef(uri=base.uri, sha256="0" * 64)])
    w.add_bytes(b"{}", "x.json")
    with pytest.raises(FailedPrecondition, match="expects"):
        w.commit()
    w = store.writer("adapter", "a", parents=[ArtifactRef(uri="tunery://proj/model-gone-000000000000")])
    w.add_bytes(b"{}", "x.json")
    with pytest.raises(NotFound):
        w.commit()


def test_materialize_verifies_and_reuses(store, tmp_path):
    m, _ = model(store, tmp_path).commit()
    d = store.materialize(m.id, tmp_path / "cache")
    assert (d / "model.safetensors").read_bytes() == b"weights"
    assert store.materialize(m.ref(), tmp_path / "cache") == d
    # tamper with the stored blob: a fresh materialisation refuses it and leaves nothing behind
    blob = store.objects.root / store.blob_key(m.file("model.safetensors").sha256)
    blob.write_bytes(b"evil!!!")
    with pytest.raises(IntegrityError):
        store.materialize(m.id, tmp_path / "cache2")
    assert not (tmp_path / "cache2" / "proj" / m.id).exists()
    with pytest.raises(IntegrityError):
        store.read_file(m.id, "model.safetensors")


def test_bad_kinds_paths_and_uris(store, tmp_path):
    with pytest.raises(InvalidArgument):
        store.writer("weights", "x")
    w = store.writer("dataset", "d")
    with pytest.raises(InvalidArgument):
        w.add_bytes(b"x", "../escape.jsonl")
    with pytest.raises(NotFound, match="belongs to project"):
        store.get("tunery://other/model-x-000000000000")


def test_materialize_a_subset(store, tmp_path):
    m, _ = model(store, tmp_path).commit()
    d = store.materialize(m.id, tmp_path / "cache", paths=["config.json", "absent.json"])
    assert sorted(p.name for p in d.iterdir()) == [".tunery-complete", "config.json"]
    assert store.materialize(m.id, tmp_path / "cache") != d  # the full copy lives elsewhere
