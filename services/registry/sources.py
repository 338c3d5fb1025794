"""Where an import's files come from, and the two halves of reading them: the checks the service answers before
queueing (`SourceChecks`, no grpc, cheap) and the fetch the import job runs (`fetch_model` / `fetch_dataset`),
which leaves the files in a folder the job then validates and stores the same way whatever the source was.

    upload://<sha256>       files the client sent (services.core.uploads), named by their listing
    s3://bucket/key         an object (a dataset) or a prefix (a model folder) in any S3: the workers'
                            TUNERY_IMPORT_S3_* credentials, else the store's own
    https://host/file.jsonl a dataset over HTTP(S), at most `url_max_bytes`; link-local hosts (cloud metadata) refused
    hf://org/name           the Hugging Face hub, where the workers have network
    /abs/path               a file or folder on the service's host, under its import roots
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from services.core.artifacts import FileEntry
from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.core.hostpaths import host_path
from services.core.modeldir import check_config, quick_check
from services.core.uploads import SCHEME as UPLOAD, Uploads

HUB = "hf://"
S3 = "s3://"
HTTP = ("https://", "http://")
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
HUB_HOST = "huggingface.co"


def kind(source: str) -> str:
    for prefix, name in ((UPLOAD, "upload"), (S3, "s3"), (HUB, "hub"), *((p, "url") for p in HTTP)):
        if source.startswith(prefix):
            return name
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        return "unknown"
    return "path"


def s3_parts(source: str, field: str) -> tuple[str, str]:
    bucket, _, key = source[len(S3):].partition("/")
    if not BUCKET.match(bucket):
        raise InvalidArgument.field(field, f"{source[:120]!r}: use s3://<bucket>/<key> (a bucket name is 3-63 of "
                                    "a-z, 0-9, '.', '-')")
    return bucket, key


def url_filename(source: str) -> str:
    return unquote(urlparse(source).path.rsplit("/", 1)[-1])


def forbidden_address(host: str) -> str:
    """Why fetching from `host` is refused ('' when it is not): link-local addresses (169.254.0.0/16, fe80::/10)
    are where clouds answer with instance credentials. A host that does not resolve is not refused here: the
    fetch says so where it runs."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return ""
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.is_link_local or (addr.version == 6 and addr.ipv4_mapped and addr.ipv4_mapped.is_link_local):
            return f"{host} is a link-local address ({addr}), where cloud metadata services answer"
    return ""


_hub_seen: tuple[float, str] = (0.0, "")


def hub_unreachable(timeout: float = 3.0) -> str:
    """Why the Hugging Face hub cannot be reached from here ('' when it can), remembered for a minute."""
    global _hub_seen
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    if time.monotonic() - _hub_seen[0] < 60:
        return _hub_seen[1]
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        why = ""
    except OSError as e:
        why = f"{HUB_HOST}:443 is unreachable ({e.strerror or e})"
    _hub_seen = (time.monotonic(), why)
    return why


class SourceChecks:
    """What the registry service answers synchronously about a source (precise status codes, nothing fetched)."""

    def __init__(self, uploads: Uploads, roots: Sequence[Path]):
        self.uploads, self.roots = uploads, roots

    def model(self, source: str, allow_trust_remote_code: bool) -> None:
        k = kind(source)
        if k == "hub":
            if source[len(HUB):].count("/") != 1:
                raise InvalidArgument.field("spec.source", f"{source!r}: use hf://<org>/<name>")
            why = hub_unreachable()
            if why:
                raise FailedPrecondition(
                    f"spec.source: {source} needs the Hugging Face hub, and this stack has no network to it "
                    f"({why}): download the model where there is network, then `tunery models import ./folder` "
                    "uploads it")
        elif k == "upload":
            files = self.uploads.listing(source, "spec.source")
            names = {f.path: f for f in files}
            if "config.json" not in names:
                raise InvalidArgument.field("spec.source", f"{source} has no config.json: upload the model's folder "
                                            "(config.json beside its weights)")
            if not any(p.endswith(".safetensors") for p in names):
                raise InvalidArgument.field("spec.source", f"{source} has no *.safetensors weights")
            try:
                import json

                config = json.loads(self.uploads.read(names["config.json"], 1 << 20))
            except ValueError as e:
                raise InvalidArgument.field("spec.source", f"config.json is not valid JSON: {e}") from None
            check_config(config, list(names), source, allow_trust_remote_code)
        elif k == "s3":
            s3_parts(source, "spec.source")
        elif k == "url":
            raise InvalidArgument.field("spec.source", "a model folder cannot come over HTTP(S): use "
                                        "hf://org/name, s3://bucket/prefix/, or upload the folder")
        elif k == "unknown":
            raise InvalidArgument.field("spec.source", f"{source[:120]!r}: use a folder, upload://, s3:// or hf://")
        else:
            quick_check(source, allow_trust_remote_code, self.roots)

    def dataset(self, source: str) -> None:
        k = kind(source)
        if k == "upload":
            files = self.uploads.listing(source, "spec.source")
            if len(files) != 1:
                raise InvalidArgument.field("spec.source", f"{source} lists {len(files)} files: a dataset is one file")
            name, size = files[0].path, files[0].size
        elif k == "s3":
            name, size = s3_parts(source, "spec.source")[1].rsplit("/", 1)[-1], None
            if not name:
                raise InvalidArgument.field("spec.source", f"{source}: name the object (s3://bucket/key)")
        elif k == "url":
            u = urlparse(source)
            if not u.hostname:
                raise InvalidArgument.field("spec.source", f"{source[:120]!r} names no host")
            why = forbidden_address(u.hostname)
            if why:
                raise PermissionDenied(f"spec.source: {why}; the registry does not fetch from there")
            name, size = url_filename(source), None
        elif k == "path":
            path = host_path(source, "spec.source", roots=self.roots, hint=" (or upload the file)")
            if not path.is_file():
                raise InvalidArgument.field("spec.source", f"{source} is not a regular file")
            name, size = path.name, path.stat().st_size
        else:
            raise InvalidArgument.field("spec.source", f"{source[:120]!r}: use a file, upload://, s3:// or https://")
        if Path(name).suffix.lower() not in DATASET_SUFFIXES:
            raise InvalidArgument.field("spec.source", f"{name or source}: use one of {', '.join(DATASET_SUFFIXES)}")
        if size == 0:
            raise InvalidArgument.field("spec.source", f"{name} is empty")


# ---------------------------------------------------------------------- the job's half
def import_store(bucket: str):
    """An S3 client for an import source: TUNERY_IMPORT_S3_* (the workers' environment), else the store's."""
    from services.core.settings import StoreSettings
    from services.core.store import S3ObjectStore

    base = StoreSettings()
    env = os.environ.get
    settings = base.model_copy(update={
        "s3_endpoint": env("TUNERY_IMPORT_S3_ENDPOINT") or base.s3_endpoint,
        "s3_access_key": env("TUNERY_IMPORT_S3_ACCESS_KEY") or base.s3_access_key,
        "s3_secret_key": env("TUNERY_IMPORT_S3_SECRET_KEY") or base.s3_secret_key,
        "s3_secure": env("TUNERY_IMPORT_S3_SECURE", str(base.s3_secure)).lower() in ("1", "true", "yes"),
        "s3_region": env("TUNERY_IMPORT_S3_REGION") or base.s3_region})
    return S3ObjectStore(settings, bucket, create_bucket=False)


def fetch_s3(source: str, dest: Path, *, folder: bool) -> Path:
    bucket, key = s3_parts(source, "spec.source")
    store = import_store(bucket)
    if not folder:
        target = dest / key.rsplit("/", 1)[-1]
        store.get_file(key, target)
        return target
    prefix = key.rstrip("/") + "/" if key else ""
    keys = [k for k in store.list(prefix) if not k.endswith("/")]
    if not keys:
        raise NotFound(f"spec.source: nothing under {source}")
    for k in keys:
        target = dest / k[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(k, target)
    return dest


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        host = urlparse(newurl).hostname or ""
        why = forbidden_address(host)
        if why:
            raise PermissionDenied(f"spec.source: a redirect to {newurl[:120]}: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(source: str, dest: Path, max_bytes: int, progress=None) -> Path:
    """Stream one file over HTTP(S) into `dest`, refusing more than `max_bytes` (by Content-Length, or as the
    bytes come when the server sends none)."""
    host = urlparse(source).hostname or ""
    why = forbidden_address(host)
    if why:
        raise PermissionDenied(f"spec.source: {why}")
    opener = urllib.request.build_opener(_CheckedRedirects)
    target = dest / (url_filename(source) or "download")
    too_big = f"spec.source: {source[:120]} is larger than this stack's import_url_max_bytes ({max_bytes:,} bytes)"
    try:
        with opener.open(urllib.request.Request(source, headers={"User-Agent": "tunery-registry"}), timeout=60) as r:
            length = int(r.headers.get("Content-Length") or -1)
            if max_bytes and length > max_bytes:
                raise ResourceExhausted(f"{too_big}: it announces {length:,}")
            done = 0
            with open(target, "wb") as f:
                while data := r.read(1 << 20):
                    done += len(data)
                    if max_bytes and done > max_bytes:
                        raise ResourceExhausted(too_big)
                    f.write(data)
                    if progress:
                        progress(done, length)
    except urllib.error.HTTPError as e:
        raise NotFound(f"spec.source: {source[:120]} answered HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise FailedPrecondition(f"spec.source: {source[:120]} cannot be fetched from this worker: {e.reason}") from None
    return target


def fetch_hub(source: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source[len(HUB):], revision=revision or None))
    except Exception as e:  # offline, no such repo, gated
        raise FailedPrecondition(f"spec.source: {source} could not be downloaded from the Hugging Face hub on this "
                                 f"worker ({type(e).__name__}: {str(e)[:300]})") from None


def uploaded(uploads: Uploads, source: str, dest: Path) -> list[FileEntry]:
    files = uploads.listing(source, "spec.source")
    uploads.materialize(files, dest)
    return files

