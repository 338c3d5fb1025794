"""The same contract for both ObjectStore implementations: the local directory and S3 (moto on 127.0.0.1)."""

import uuid

import pytest

from services.core.errors import InvalidArgument, NotFound
from services.core.settings import StoreSettings
from services.core.store import LocalObjectStore, S3ObjectStore, key_of, open_store
from tests.servers import S3Server


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "store")
    settings = StoreSettings(store_url="s3://unit-store", s3_endpoint=s3.endpoint, s3_access_key="k",
                             s3_secret_key="s", s3_part_size=5 * 1024 * 1024)
    return S3ObjectStore(settings, f"unit-{uuid.uuid4().hex[:8]}")


def test_roundtrip_list_delete(store, tmp_path):
    store.ping()
    store.put_bytes("p/a/1.json", b"one")
    store.put_bytes("p/a/2.json", b"two")
    store.put_bytes("p/b/3.json", b"three")
    assert store.get_bytes("p/a/1.json") == b"one"
    assert store.size("p/a/2.json") == 3 and store.size("p/none") is None
    assert list(store.list("p/a/")) == ["p/a/1.json", "p/a/2.json"]
    assert list(store.list("p/a/", start_after="p/a/1.json")) == ["p/a/2.json"]
    assert list(store.list("p/")) == ["p/a/1.json", "p/a/2.json", "p/b/3.json"]
    store.delete("p/a/1.json")
    with pytest.raises(NotFound):
        store.get_bytes("p/a/1.json")
    dest = tmp_path / "out"
    store.get_file("p/b/3.json", dest)
    assert dest.read_bytes() == b"three"


def test_large_file_goes_up_whole(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 4096 + 7))  # ~12.6 MB: multipart on S3
    store.put_file("p/big.bin", big)
    assert store.size("p/big.bin") == big.stat().st_size
    out = tmp_path / "back.bin"
    store.get_file("p/big.bin", out)
    assert out.read_bytes() == big.read_bytes()


def test_keys_are_validated(store):
    for bad in ("../x", "/abs", "a//b"):
        with pytest.raises(InvalidArgument):
            store.put_bytes(bad, b"x")


def test_open_store_and_key_of(tmp_path):
    s = open_store(StoreSettings(store_url=f"file://{tmp_path}"))
    assert key_of(s, f"file://{tmp_path}/projects/p/jobs/j/spec.json") == "projects/p/jobs/j/spec.json"
    with pytest.raises(InvalidArgument):
        key_of(s, "s3://elsewhere/x")
    for url in ("http://x", "s3://bucket/with/path", "ftp://a"):
        with pytest.raises(InvalidArgument):
            open_store(StoreSettings(store_url=url))


def test_local_writes_are_atomic(tmp_path):
    s = LocalObjectStore(tmp_path)

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        s._atomic_write("p/x", boom)
    assert s.size("p/x") is None and list(s.list("p/")) == []
