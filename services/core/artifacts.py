"""Immutable, content-addressed artifacts with a manifest written last.

Layout below the store root (one prefix per project):

    projects/<project>/blobs/sha256/<aa>/<sha256>        file contents, stored once whatever references them
    projects/<project>/artifacts/<id>/manifest.json      the artifact; absent manifest = no artifact
    projects/<project>/refs/<parent-id>/<child-id>       reverse parent links (Delete refuses while a child exists)
    projects/<project>/jobs/<job-id>/...                 job specs, events and state (services.core.jobs)

An artifact id is `<kind>-<name>-<digest[:12]>` where the digest covers kind, name, parents and every
file's sha256: importing the same weights twice yields the same artifact and uploads 0 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.core.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from services.core.keys import validate_id, validate_name, validate_relpath
from services.core.store import ObjectStore
from services.core.weights import TensorInfo, read_header

KINDS = ("model", "dataset", "adapter", "report", "checkpoint", "suite")
URI_SCHEME = "tunery://"
MANIFEST = "manifest.json"
CHUNK = 4 * 1024 * 1024


class ArtifactRef(BaseModel):
    uri: str
    sha256: str = ""

    @classmethod
    def unset(cls) -> "ArtifactRef":
        """A request field the caller left empty (ArtifactStore.require says it is required)."""
        return cls(uri="")


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    id: str
    kind: str
    name: str
    project: str
    sha256: str
    parents: list[ArtifactRef] = Field(default_factory=list)
    files: list[FileEntry] = Field(default_factory=list)
    created_by_job: str = ""
    created_at: float = 0.0
    metadata: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    total_bytes: int = 0

    @property
    def uri(self) -> str:
        return f"{URI_SCHEME}{self.project}/{self.id}"

    def ref(self) -> ArtifactRef:
        return ArtifactRef(uri=self.uri, sha256=self.sha256)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise NotFound(f"artifact {self.id} has no file {path!r}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(kind: str, name: str, parents: Iterable[ArtifactRef], files: Iterable[FileEntry]) -> str:
    body = {
        "kind": kind,
        "name": name,
        "parents": sorted(p.sha256 or p.uri for p in parents),
        "files": sorted([f.path, f.sha256] for f in files),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ArtifactStore:
    def __init__(self, objects: ObjectStore, project: str):
        self.objects = objects
        self.project = validate_name(project, "project")
        self.prefix = f"projects/{self.project}/"

    # ------------------------------------------------------------------ keys
    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def blob_key(self, sha: str) -> str:
        return self.key("blobs", "sha256", sha[:2], sha)

    def _manifest_key(self, artifact_id: str) -> str:
        return self.key("artifacts", validate_id(artifact_id, "artifact id"), MANIFEST)

    def parse_id(self, id_or_uri: str) -> str:
        if id_or_uri.startswith(URI_SCHEME):
            rest = id_or_uri[len(URI_SCHEME):]
            project, _, artifact_id = rest.partition("/")
            if project != self.project:
                raise NotFound(f"{id_or_uri} belongs to project {project!r}, not {self.project!r}")
            id_or_uri = artifact_id
        return validate_id(id_or_uri, "artifact id")

    # ------------------------------------------------------------------ writing
    def writer(self, kind: str, name: str, *, parents: Iterable[ArtifactRef] = (), job_id: str = "") -> "ArtifactWriter":
        if kind not in KINDS:
            raise InvalidArgument.field("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
        return ArtifactWriter(self, kind, validate_name(name), list(parents), job_id)

    def put_blob(self, path: Path, sha: str | None = None) -> tuple[str, int, int]:
        """Store a file's content once. Returns (sha256, size, bytes uploaded: 0 when already stored)."""
        sha = sha or sha256_file(path)
        size = path.stat().st_size
        key = self.blob_key(sha)
        if self.objects.size(key) == size:
            return sha, size, 0
        self.objects.put_file(key, path)
        return sha, size, size

    def commit(self, manifest: Manifest) -> tuple[Manifest, bool]:
        """Write child refs then the manifest (last). Returns (manifest, created); an identical artifact that
        already exists is returned as it is."""
        for parent in manifest.parents:
            self.resolve(parent)
        existing = self._try_get(manifest.id)
        if existing is not None:
            return existing, False
        for parent in manifest.parents:
            self.objects.put_bytes(self.key("refs", self.parse_id(parent.uri), manifest.id), b"")
        self.objects.put_bytes(self._manifest_key(manifest.id), manifest.model_dump_json(indent=1).encode())
        return manifest, True

    # ------------------------------------------------------------------ reading
    def find(self, id_or_uri: str) -> Manifest | None:
        """The artifact, or None when it does not exist (deleted, pruned)."""
        return self._try_get(self.parse_id(id_or_uri))

    def _try_get(self, artifact_id: str) -> Manifest | None:
        try:
            raw = self.objects.get_bytes(self._manifest_key(artifact_id))
        except NotFound:
            return None
        return Manifest.model_validate_json(raw)

    def get(self, id_or_uri: str) -> Manifest:
        artifact_id = self.parse_id(id_or_uri)
        m = self._try_get(artifact_id)
        if m is None:
            raise NotFound(f"artifact {artifact_id} not found in project {self.project}")
        return m

    def resolve(self, ref: ArtifactRef) -> Manifest:
        """The manifest a reference names, checked against the reference's sha256 when it carries one."""
        m = self.get(ref.uri)
        if ref.sha256 and ref.sha256 != m.sha256:
            raise FailedPrecondition(
                f"{ref.uri} has sha256 {m.sha256[:12]}…, but the reference expects {ref.sha256[:12]}…"
            )
        return m

    def require(self, ref: ArtifactRef | None, field: str, kind: str) -> Manifest:
        """A request's artifact field: present (InvalidArgument), existing (NotFound) and of `kind`
        (FailedPrecondition), each error naming the field."""
        if ref is None or not ref.uri:
            raise InvalidArgument.field(field, f"is required (a {kind} artifact id or tunery:// uri)")
        m = self.resolve(ref)
        if m.kind != kind:
            raise FailedPrecondition(f"{field}: {m.id} is a {m.kind} artifact, not a {kind}")
        return m

    def list(self, kind: str = "", name: str = "", *, after: str = "", limit: int = 50) -> tuple[list[Manifest], str]:
        """Manifests in id order, filtered; returns (page, next_after) with next_after empty at the end."""
        prefix = self.key("artifacts") + "/"
        if kind:
            prefix += f"{kind}-" + (f"{name}-" if name else "")
        start_after = self.key("artifacts", after, MANIFEST) if after else ""
        page: list[Manifest] = []
        for key in self.objects.list(prefix, start_after):
            if not key.endswith("/" + MANIFEST):
                continue
            m = Manifest.model_validate_json(self.objects.get_bytes(key))
            if (kind and m.kind != kind) or (name and m.name != name):
                continue
            if len(page) == limit:
                return page, page[-1].id
            page.append(m)
        return page, ""

    def children(self, id_or_uri: str) -> list[str]:
        artifact_id = self.parse_id(id_or_uri)
        prefix = self.key("refs", artifact_id) + "/"
        return [k[len(prefix):] for k in self.objects.list(prefix) if self._try_get(k[len(prefix):]) is not None]

    def lineage(self, id_or_uri: str, max_depth: int = 0) -> list[Manifest]:
        first = self.get(id_or_uri)
        out, seen, frontier, depth = [first], {first.id}, [first], 0
        while frontier and (max_depth <= 0 or depth < max_depth):
            nxt = []
            for m in frontier:
                for p in m.parents:
                    pid = self.parse_id(p.uri)
                    if pid in seen:
                        continue
                    seen.add(pid)
                    parent = self._try_get(pid)
                    if parent is not None:
                        out.append(parent)
                        nxt.append(parent)
            frontier, depth = nxt, depth + 1
        return out

    def delete(self, id_or_uri: str) -> Manifest:
        m = self.get(id_or_uri)
        kids = self.children(m.id)
        if kids:
            raise FailedPrecondition(
                f"artifact {m.id} is a parent of {', '.join(sorted(kids))}; delete those first"
            )
        self.objects.delete(self._manifest_key(m.id))  # gone for readers from here on
        for p in m.parents:
            self.objects.delete(self.key("refs", self.parse_id(p.uri), m.id))
        return m

    def read_file(self, id_or_uri: str, path: str) -> bytes:
        entry = self.get(id_or_uri).file(path)
        data = self.objects.get_bytes(self.blob_key(entry.sha256))
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"blob for {path} does not match its sha256 {entry.sha256}")
        return data

    def tensors(self, m: Manifest) -> dict[str, dict[str, TensorInfo]]:
        """Every *.safetensors file of an artifact -> its tensors, read from the headers alone (ranged reads of the
        blobs; no weights are downloaded)."""
        out = {}
        for f in m.files:
            if f.path.endswith(".safetensors"):
                key = self.blob_key(f.sha256)
                out[f.path] = read_header(lambda offset, length, key=key: self.objects.get_range(key, offset, length),
                                          f.size, f"{m.id}/{f.path}", field="artifact")
        return out

    def fetch_blob(self, entry: FileEntry, target: Path, where: str = "") -> Path:
        """One file's blob saved to `target`, verified against its sha256 (IntegrityError otherwise)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        self.objects.get_file(self.blob_key(entry.sha256), target)
        got = sha256_file(target)
        if got != entry.sha256:
            raise IntegrityError(f"{where}{entry.path}: sha256 {got} does not match the expected {entry.sha256}")
        return target

    def materialize(self, ref: ArtifactRef | str, cache_dir: Path, paths: Iterable[str] | None = None) -> Path:
        """Download an artifact's files into cache_dir/<project>/<id>, each verified against its sha256.
        `paths` limits it to those files that exist (a tokenizer without the weights, say), in a folder of
        its own. A complete copy is reused; a partial one is never visible under the final name."""
        m = self.resolve(ref) if isinstance(ref, ArtifactRef) else self.get(ref)
        files = m.files
        folder = m.id
        if paths is not None:
            wanted = set(paths)
            files = [f for f in m.files if f.path in wanted]
            folder += "-" + hashlib.sha256("\n".join(sorted(wanted)).encode()).hexdigest()[:8]
        dest = Path(cache_dir) / self.project / folder
        marker = dest / ".tunery-complete"
        if marker.exists() and marker.read_text() == m.sha256:
            return dest
        tmp = dest.parent / f".tmp-{folder}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for f in files:
                self.fetch_blob(f, tmp / validate_relpath(f.path), f"{m.id}/")
            (tmp / ".tunery-complete").write_text(m.sha256)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


class ArtifactWriter:
    """Collects files (uploading blobs as they come), then commits the manifest last."""

    def __init__(self, store: ArtifactStore, kind: str, name: str, parents: list[ArtifactRef], job_id: str):
        self.store, self.kind, self.name, self.parents, self.job_id = store, kind, name, parents, job_id
        self.files: dict[str, FileEntry] = {}
        self.bytes_uploaded = 0
        self.bytes_total = 0

    def add_file(self, path: Path, relpath: str) -> FileEntry:
        relpath = validate_relpath(relpath)
        if relpath in self.files:
            raise InvalidArgument.field("path", f"{relpath} added twice")
        sha, size, uploaded = self.store.put_blob(Path(path))
        self.bytes_uploaded += uploaded
        self.bytes_total += size
        entry = FileEntry(path=relpath, size=size, sha256=sha)
        self.files[relpath] = entry
        return entry

    def add_bytes(self, data: bytes, relpath: str) -> FileEntry:
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"tunery-blob-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            return self.add_file(tmp, relpath)
        finally:
            tmp.unlink(missing_ok=True)

    def add_dir(self, root: Path, files: Iterable[Path] | None = None) -> Iterator[FileEntry]:
        root = Path(root)
        for p in sorted(files if files is not None else (q for q in root.rglob("*") if q.is_file())):
            yield self.add_file(p, p.relative_to(root).as_posix())

    def commit(self, metadata: dict[str, Any] | None = None, metrics: dict[str, float] | None = None) -> tuple[Manifest, bool]:
        files = sorted(self.files.values(), key=lambda f: f.path)
        digest = content_digest(self.kind, self.name, self.parents, files)
        manifest = Manifest(
            id=f"{self.kind}-{self.name}-{digest[:12]}",
            kind=self.kind,
            name=self.name,
            project=self.store.project,
            sha256=digest,
            parents=self.parents,
            files=files,
            created_by_job=self.job_id,
            created_at=time.time(),
            metadata=metadata or {},
            metrics=metrics or {},
            total_bytes=sum(f.size for f in files),
        )
        return self.store.commit(manifest)
