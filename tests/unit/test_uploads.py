"""The upload protocol (services.core.uploads) on a local store, with 16-byte parts so every case crosses parts:
whole streams, a stream that breaks and resumes, wrong offsets, bytes that do not hash to the declared sha256,
too many bytes, the size limit, and the listings an import names. (Over gRPC and S3: the integration tier.)"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from services.core.artifacts import ArtifactStore, FileEntry
from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.store import LocalObjectStore
from services.core.uploads import Chunk, Uploads, listing_bytes, upload_uri

pytestmark = pytest.mark.unit
PART = 16


@pytest.fixture
def uploads(tmp_path) -> Uploads:
    return Uploads(ArtifactStore(LocalObjectStore(tmp_path / "store"), "p"), part=PART)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(uploads: Uploads, data: bytes, *, offset: int = 0, stop: int | None = None, step: int = 7,
         declared: str = "", size: int | None = None):
    """One stream of `step`-byte chunks from `offset` up to `stop` (a broken connection when short of the end)."""
    end = len(data) if stop is None else stop

    async def chunks():
        pos = offset
        while True:
            yield Chunk(declared or sha(data), len(data) if size is None else size, pos, data[pos:min(pos + step, end)])
            pos = min(pos + step, end)
            if pos >= end:
                return

    return asyncio.run(uploads.receive(chunks()))


def parts_left(uploads: Uploads) -> list[str]:
    return list(uploads.objects.list(uploads.artifacts.key("uploads") + "/"))


def test_one_stream_stores_the_blob_and_leaves_no_parts(uploads):
    data = bytes(range(256)) * 3  # 768 bytes: 48 parts
    st = send(uploads, data)
    assert st.stored and st.received == len(data)
    assert uploads.objects.get_bytes(uploads.artifacts.blob_key(sha(data))) == data
    assert parts_left(uploads) == []
    assert uploads.status(sha(data), len(data)).stored
    # a second stream of the same file is answered at once: nothing is read again
    assert send(uploads, data, stop=1).stored


def test_a_broken_stream_keeps_whole_parts_and_resumes_from_them(uploads):
    data = b"0123456789abcdef" * 5 + b"tail"  # 84 bytes
    st = send(uploads, data, stop=45)  # the connection drops inside the third part
    assert not st.stored and st.received == 32  # two whole parts kept, the partial third resent
    assert uploads.status(sha(data), len(data)).received == 32
    assert uploads.objects.size(uploads.artifacts.blob_key(sha(data))) is None  # nothing visible yet
    with pytest.raises(FailedPrecondition, match="send from offset 32"):
        send(uploads, data, offset=0)
    st = send(uploads, data, offset=32)  # resumed: the kept parts are hashed with the rest
    assert st.stored and uploads.objects.get_bytes(uploads.artifacts.blob_key(sha(data))) == data
    assert parts_left(uploads) == []


def test_bytes_that_do_not_hash_to_the_declared_sha256_store_nothing(uploads):
    data = b"x" * 40
    with pytest.raises(InvalidArgument, match="hash to .* not the declared"):
        send(uploads, data, declared=sha(b"something else"))
    assert uploads.objects.size(uploads.artifacts.blob_key(sha(b"something else"))) is None
    assert parts_left(uploads) == []
    # the same after a resume (the kept parts are what fails the check)
    send(uploads, data, declared=sha(b"y" * 40), stop=20)
    with pytest.raises(InvalidArgument, match="nothing was stored"):
        send(uploads, data, declared=sha(b"y" * 40), offset=16)
    assert parts_left(uploads) == []


def test_malformed_streams_are_request_errors(uploads):
    data = b"z" * 20
    with pytest.raises(InvalidArgument, match="more bytes than the declared size"):
        send(uploads, data, size=10)
    with pytest.raises(InvalidArgument, match="sha256"):
        send(uploads, data, declared="not-a-sha")
    with pytest.raises(InvalidArgument, match="negative"):
        send(uploads, data, size=-1)

    async def nothing():
        return
        yield  # pragma: no cover

    with pytest.raises(InvalidArgument, match="at least one message"):
        asyncio.run(uploads.receive(nothing()))

    async def two_files():
        yield Chunk(sha(data), 20, 0, data[:5])
        yield Chunk(sha(b"other"), 20, 5, data[5:])

    with pytest.raises(InvalidArgument, match="same file"):
        asyncio.run(uploads.receive(two_files()))


def test_an_empty_file_and_the_size_limit(uploads, tmp_path):
    assert send(uploads, b"").stored
    assert uploads.objects.get_bytes(uploads.artifacts.blob_key(sha(b""))) == b""
    small = Uploads(uploads.artifacts, part=PART, max_bytes=10)
    with pytest.raises(ResourceExhausted, match="upload limit of 10 bytes"):
        small.status(sha(b"x" * 11), 11)


def test_listings_name_uploaded_files_only(uploads):
    a, b = b'{"model_type": "llama"}', b"weights" * 9
    for data in (a, b):
        send(uploads, data)
    files = [FileEntry(path="config.json", size=len(a), sha256=sha(a)),
             FileEntry(path="sub/model.safetensors", size=len(b), sha256=sha(b))]
    listing = listing_bytes(files)
    send(uploads, listing)
    assert uploads.listing(upload_uri(sha(listing)), "spec.source") == files

    def stored_listing(body) -> str:
        raw = json.dumps(body).encode()
        send(uploads, raw)
        return upload_uri(sha(raw))

    missing = FileEntry(path="other.bin", size=3, sha256=sha(b"abc"))
    with pytest.raises(FailedPrecondition, match="other.bin .* is not uploaded"):
        uploads.listing(stored_listing({"tunery_upload": 1, "files": [missing.model_dump()]}), "spec.source")
    with pytest.raises(FailedPrecondition, match="is not uploaded: upload the listing"):
        uploads.listing(upload_uri(sha(b"never sent")), "spec.source")
    for bad, words in [({"files": []}, "not an upload listing"), ([1, 2], "not an upload listing"),
                       ({"tunery_upload": 1, "files": []}, "lists 0 files"),
                       ({"tunery_upload": 1, "files": [files[0].model_dump()] * 2}, "twice"),
                       ({"tunery_upload": 1, "files": [{**files[0].model_dump(), "path": "../../etc/passwd"}]},
                        "not a safe relative path")]:
        with pytest.raises(InvalidArgument, match=words):
            uploads.listing(stored_listing(bad), "spec.source")
    with pytest.raises(InvalidArgument, match="not a sha256"):
        uploads.listing("upload://xyz", "spec.source")
