"""Object storage: one interface, two implementations (a local directory, and S3/MinIO on the minio client).

Keys are full keys below the store root (the artifact layer adds the per-project prefix). Every write is
atomic: a reader sees the whole object or none of it.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.core.keys import validate_key
from services.core.settings import StoreSettings


class ObjectStore(Protocol):
    url: str

    def ping(self) -> None: ...
    def size(self, key: str) -> int | None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def put_stream(self, key: str, stream: BinaryIO, size: int) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def list(self, prefix: str, start_after: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...


class LocalObjectStore:
    """A directory on local disk: the embedded default. Writes go to a temp file and are renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.url = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def ping(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise Unavailable(f"store directory {self.root} is not writable")

    def size(self, key: str) -> int | None:
        p = self._path(key)
        return p.stat().st_size if p.is_file() else None

    def _atomic_write(self, key: str, write) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            write(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda tmp: tmp.write_bytes(data))

    def put_file(self, key: str, path: Path) -> None:
        self._atomic_write(key, lambda tmp: shutil.copyfile(path, tmp))

    def put_stream(self, key: str, stream: BinaryIO, size: int) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(stream, f, 4 << 20)
            if tmp.stat().st_size != size:
                raise IOError(f"{key}: the stream gave {tmp.stat().st_size} bytes, not {size}")

        self._atomic_write(key, write)

    def get_bytes(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise NotFound(f"object {key} not found in {self.url}")
        return p.read_bytes()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise NotFound(f"object {key} not found in {self.url}")
        with open(p, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def get_file(self, key: str, dest: Path) -> None:
        p = self._path(key)
        if not p.is_file():
            raise NotFound(f"object {key} not found in {self.url}")
        shutil.copyfile(p, dest)

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        base = self.root
        start = base / prefix if prefix.endswith("/") else (base / prefix).parent
        if not start.is_dir():
            return
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".tmp-")]
            for f in filenames:
                if f.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/")
                if key.startswith(prefix) and key > start_after:
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3ObjectStore:
    """S3 / MinIO through the minio client: the bucket is created on first use, large files go multipart,
    and transient HTTP failures are retried with backoff."""

    def __init__(self, settings: StoreSettings, bucket: str, *, create_bucket: bool = True):
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.url = f"s3://{bucket}"
        self.part_size = max(settings.s3_part_size, 5 * 1024 * 1024)
        retry = urllib3.Retry(
            total=settings.s3_retries,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=None,  # retry PUTs too: every write here is idempotent
        )
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=300), retries=retry, maxsize=16, cert_reqs="CERT_REQUIRED"
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key or None,
            secret_key=settings.s3_secret_key or None,
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        self._bucket_ready = False
        self.create_bucket = create_bucket

    def _ready(self) -> None:
        if self._bucket_ready:
            return
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                if not self.create_bucket:
                    raise NotFound(f"bucket {self.bucket} does not exist at {self.client._base_url.host}")
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:  # created concurrently
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        except S3Error as e:
            raise FailedPrecondition(f"bucket {self.bucket}: {e.code}: {e.message}") from e
        except NotFound:
            raise
        except Exception as e:  # connection refused, DNS, timeouts
            raise Unavailable(f"S3 endpoint unreachable for {self.url}: {e}") from e
        self._bucket_ready = True

    def ping(self) -> None:
        self._bucket_ready = False
        self._ready()

    def size(self, key: str) -> int | None:
        from minio.error import S3Error

        self._ready()
        try:
            return self.client.stat_object(self.bucket, validate_key(key)).size
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ready()
        self.client.put_object(self.bucket, validate_key(key), io.BytesIO(data), len(data))

    def put_file(self, key: str, path: Path) -> None:
        self._ready()
        self.client.fput_object(self.bucket, validate_key(key), str(path), part_size=self.part_size)

    def put_stream(self, key: str, stream: BinaryIO, size: int) -> None:
        """Multipart from a stream of known size: nothing is visible under `key` before the last part lands."""
        self._ready()
        self.client.put_object(self.bucket, validate_key(key), stream, size, part_size=self.part_size)

    def get_bytes(self, key: str) -> bytes:
        from minio.error import S3Error

        self._ready()
        try:
            resp = self.client.get_object(self.bucket, validate_key(key))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key} not found in {self.url}") from e
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        from minio.error import S3Error

        self._ready()
        try:
            resp = self.client.get_object(self.bucket, validate_key(key), offset=offset, length=length)
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key} not found in {self.url}") from e
            raise
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def get_file(self, key: str, dest: Path) -> None:
        from minio.error import S3Error

        self._ready()
        try:
            self.client.fget_object(self.bucket, validate_key(key), str(dest))
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"object {key} not found in {self.url}") from e
            raise

    def list(self, prefix: str, start_after: str = "") -> Iterator[str]:
        self._ready()
        for obj in self.client.list_objects(
            self.bucket, prefix=prefix, recursive=True, start_after=start_after or None
        ):
            yield obj.object_name

    def delete(self, key: str) -> None:
        self._ready()
        self.client.remove_object(self.bucket, validate_key(key))


def open_store(settings: StoreSettings) -> ObjectStore:
    u = urlparse(settings.store_url)
    if u.scheme == "file":
        return LocalObjectStore(Path(u.path))
    if u.scheme == "s3":
        if not u.netloc or u.path not in ("", "/"):
            raise InvalidArgument.field("store_url", f"{settings.store_url!r}: use s3://<bucket>")
        return S3ObjectStore(settings, u.netloc)
    raise InvalidArgument.field("store_url", f"{settings.store_url!r}: use file:///path or s3://bucket")


def key_of(store: ObjectStore, uri: str) -> str:
    """The key of an object URI inside this store (a job's spec URI, say)."""
    prefix = store.url.rstrip("/") + "/"
    if not uri.startswith(prefix):
        raise InvalidArgument.field("uri", f"{uri!r} is not inside the configured store {store.url}")
    return validate_key(uri[len(prefix):])


def scratch_dir(prefix: str = "tunery-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
