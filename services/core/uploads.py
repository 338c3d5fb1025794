"""Files sent from a client's machine into the store, as content-addressed blobs: resumable, checked, and never
visible before they are whole.

An upload is named by the sha256 and size the client declares. Its bytes land as fixed-size parts below

    projects/<project>/uploads/<sha256>/<size>/<index:08d>

so a dropped connection loses at most the part in flight, and the client resumes from `received` (StatUpload).
When the last byte is in, the parts are hashed (on the fly when the whole file came in one stream), and only a
file whose bytes hash to the declared sha256 is written to its blob key (`ArtifactStore.blob_key`), in one atomic
put; the parts are then deleted. A blob already stored is never sent again.

Several files (a model folder) travel as their blobs plus a *listing*, itself an uploaded blob:

    {"tunery_upload": 1, "files": [{"path": "config.json", "sha256": "…", "size": 123}, …]}

and an import names it `upload://<sha256 of the listing>`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.core.artifacts import ArtifactStore, FileEntry
from services.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.core.keys import validate_relpath

SCHEME = "upload://"
PART = 8 * 1024 * 1024
LISTING_MAX = 4 * 1024 * 1024
LISTING_FILES_MAX = 100_000
SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UploadStatus:
    sha256: str
    size: int
    stored: bool          # the blob is in the store: nothing (more) to send
    received: int         # bytes kept so far (whole parts); resume from here


@dataclass(frozen=True)
class Chunk:
    sha256: str           # the first chunk must name the file; later ones may leave it empty
    size: int
    offset: int
    data: bytes


def check_sha(sha: str, field: str) -> str:
    if not SHA.match(sha or ""):
        raise InvalidArgument.field(field, f"{sha[:80]!r} is not a sha256 (64 lowercase hex digits)")
    return sha


def upload_uri(listing_sha: str) -> str:
    return SCHEME + listing_sha


def listing_bytes(files: Iterable[FileEntry]) -> bytes:
    """The listing of several uploaded files (what `upload://<its sha256>` names)."""
    body = {"tunery_upload": 1, "files": [f.model_dump() for f in sorted(files, key=lambda f: f.path)]}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class PartsReader(io.RawIOBase):
    """The parts of an upload read back in order as one stream (for the blob's single atomic put)."""

    def __init__(self, uploads: "Uploads", sha: str, size: int):
        self.uploads, self.sha, self.size = uploads, sha, size
        self.index, self.buf = 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self.buf:
            if self.index * self.uploads.part >= self.size:
                return 0
            self.buf = self.uploads.read_part(self.sha, self.size, self.index)
            self.index += 1
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


class Uploads:
    """The upload protocol over one project's store (used by the registry service; no grpc)."""

    def __init__(self, artifacts: ArtifactStore, *, part: int = PART, max_bytes: int = 0):
        self.artifacts, self.objects = artifacts, artifacts.objects
        self.part, self.max_bytes = part, max_bytes

    # ------------------------------------------------------------------ keys
    def _prefix(self, sha: str, size: int) -> str:
        return self.artifacts.key("uploads", sha, str(size)) + "/"

    def _part_key(self, sha: str, size: int, index: int) -> str:
        return self._prefix(sha, size) + f"{index:08d}"

    def read_part(self, sha: str, size: int, index: int) -> bytes:
        return self.objects.get_bytes(self._part_key(sha, size, index))

    # ------------------------------------------------------------------ protocol
    def check(self, sha: str, size: int) -> None:
        check_sha(sha, "sha256")
        if size < 0:
            raise InvalidArgument.field("size", f"{size} is negative")
        if self.max_bytes and size > self.max_bytes:
            raise ResourceExhausted(f"a file of {size:,} bytes is above this stack's upload limit of "
                                    f"{self.max_bytes:,} bytes (TUNERY_MAX_UPLOAD_BYTES)")

    def status(self, sha: str, size: int) -> UploadStatus:
        self.check(sha, size)
        if self.objects.size(self.artifacts.blob_key(sha)) == size:
            return UploadStatus(sha, size, True, size)
        # one listing, not a request per part: a part is written whole (an atomic put) or not at all
        prefix = self._prefix(sha, size)
        kept = {k[len(prefix):] for k in self.objects.list(prefix)}
        index = 0
        while index * self.part < size and f"{index:08d}" in kept:
            index += 1
        return UploadStatus(sha, size, False, min(index * self.part, size))

    async def receive(self, chunks: AsyncIterator[Chunk]) -> UploadStatus:
        """Take one stream of chunks; returns where the upload stands when the stream ends (stored, or the bytes
        kept to resume from). Each whole part is written as it fills; a partial part at a dropped connection is
        not kept (the client resends it)."""
        import asyncio

        first = await anext(aiter(chunks), None)
        if first is None:
            raise InvalidArgument("an upload stream needs at least one message naming sha256, size and offset")
        sha, size = first.sha256, first.size
        st = await asyncio.to_thread(self.status, sha, size)
        if st.stored:
            return st
        if first.offset != st.received:
            raise FailedPrecondition(f"upload {sha[:12]}…: {st.received:,} of {size:,} bytes are kept; send from "
                                     f"offset {st.received} (StatUpload says where to resume), not {first.offset}")
        pos = first.offset                      # bytes kept in whole parts
        hasher = hashlib.sha256() if pos == 0 else None
        buf = bytearray()
        chunk: Chunk | None = first
        while chunk is not None:
            if chunk is not first:
                if chunk.sha256 not in ("", sha) or chunk.size not in (0, size):
                    raise InvalidArgument("every chunk of one stream belongs to the same file (sha256 and size)")
                if chunk.offset not in (0, pos + len(buf)):
                    raise InvalidArgument.field("offset", f"{chunk.offset} does not follow the bytes sent "
                                                f"({pos + len(buf)})")
            if pos + len(buf) + len(chunk.data) > size:
                raise InvalidArgument.field("data", f"more bytes than the declared size {size:,}")
            buf += chunk.data
            if hasher is not None:
                hasher.update(chunk.data)
            while len(buf) >= self.part:
                await asyncio.to_thread(self.objects.put_bytes, self._part_key(sha, size, pos // self.part),
                                        bytes(buf[:self.part]))
                del buf[:self.part]
                pos += self.part
            chunk = await anext(aiter(chunks), None)
        if pos + len(buf) < size:
            return UploadStatus(sha, size, False, pos)
        if buf:
            await asyncio.to_thread(self.objects.put_bytes, self._part_key(sha, size, pos // self.part), bytes(buf))
        return await asyncio.to_thread(self._finish, sha, size, hasher.hexdigest() if hasher else "")

    def _finish(self, sha: str, size: int, digest: str) -> UploadStatus:
        parts = [self._part_key(sha, size, i) for i in range(-(-size // self.part))]
        if not digest:                          # resumed: hash what is kept
            h = hashlib.sha256()
            for key in parts:
                h.update(self.objects.get_bytes(key))
            digest = h.hexdigest()
        try:
            if digest != sha:
                raise InvalidArgument.field("sha256", f"the {size:,} bytes received hash to {digest[:12]}…, not the "
                                            f"declared {sha[:12]}…: nothing was stored; send the file again")
            self.objects.put_stream(self.artifacts.blob_key(sha), PartsReader(self, sha, size), size)
        finally:
            for key in parts:
                self.objects.delete(key)
        return UploadStatus(sha, size, True, size)

    # ------------------------------------------------------------------ what an import names
    def listing(self, uri: str, field: str) -> list[FileEntry]:
        """The files an `upload://<sha>` source names, each one's blob present with its size: INVALID_ARGUMENT for
        a malformed listing, FAILED_PRECONDITION for a file not (yet) uploaded."""
        sha = check_sha(uri[len(SCHEME):], field)
        size = self.objects.size(self.artifacts.blob_key(sha))
        if size is None:
            raise FailedPrecondition(f"{field}: {uri} is not uploaded: upload the listing and its files first "
                                     "(the CLI and the SDK's upload() do both)")
        if size > LISTING_MAX:
            raise InvalidArgument.field(field, f"{uri} is {size:,} bytes: an upload listing is at most {LISTING_MAX:,}")
        raw = self.objects.get_bytes(self.artifacts.blob_key(sha))
        if hashlib.sha256(raw).hexdigest() != sha:
            raise FailedPrecondition(f"{field}: the stored listing {sha[:12]}… does not match its sha256")
        try:
            body = json.loads(raw)
            assert isinstance(body, dict) and body.get("tunery_upload") == 1 and isinstance(body.get("files"), list)
            files = [FileEntry.model_validate(f) for f in body["files"]]
        except Exception:
            raise InvalidArgument.field(field, f"{uri} is not an upload listing ({{\"tunery_upload\": 1, "
                                        "\"files\": [{path, sha256, size}, …]}})") from None
        if not files or len(files) > LISTING_FILES_MAX:
            raise InvalidArgument.field(field, f"{uri} lists {len(files)} files (1 to {LISTING_FILES_MAX:,})")
        seen: set[str] = set()
        for f in files:
            validate_relpath(f.path, field)
            check_sha(f.sha256, field)
            if f.path in seen:
                raise InvalidArgument.field(field, f"{uri} lists {f.path!r} twice")
            seen.add(f.path)
            if self.objects.size(self.artifacts.blob_key(f.sha256)) != f.size:
                raise FailedPrecondition(f"{field}: {f.path} ({f.size:,} bytes, sha256 {f.sha256[:12]}…) of {uri} "
                                         "is not uploaded: upload it, then import again")
        return files

    def read(self, entry: FileEntry, limit: int = LISTING_MAX) -> bytes:
        """One small uploaded file's bytes (a config.json the import checks before queueing)."""
        if entry.size > limit:
            raise InvalidArgument.field("spec.source", f"{entry.path} is {entry.size:,} bytes (at most {limit:,})")
        return self.objects.get_bytes(self.artifacts.blob_key(entry.sha256))

    def materialize(self, files: list[FileEntry], dest: Path) -> Path:
        """The listed files under `dest`, each verified against its sha256 (the import job's copy)."""
        for f in files:
            self.artifacts.fetch_blob(f, dest / validate_relpath(f.path))
        return dest

