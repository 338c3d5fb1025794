"""Paths on the service's own host that a request names (a model directory, a dataset file): checked before any
filesystem call can raise, so a bad path is INVALID_ARGUMENT naming the field, never INTERNAL; and confined to the
import roots (ServiceSettings.import_roots) before the path is even looked at, so a client learns nothing of the
host outside them (not whether a file exists, not what a folder holds)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from collections.abc import Sequence

from services.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

PATH_MAX = 4096   # Linux's limits (limits.h): a whole path, and one component
NAME_MAX = 255


def outside(path: Path, roots: Sequence[Path]) -> bool:
    return not any(path == r or path.is_relative_to(r) for r in roots)


def denied(field: str, shown: str, roots: Sequence[Path]) -> PermissionDenied:
    where = ", ".join(str(r) for r in roots) or "none are configured"
    return PermissionDenied(
        f"{field}: {shown} is outside this stack's import roots ({where}): upload it from your machine instead "
        "(`tunery models import` / `tunery datasets import` do so for a local path), or ask the operator to add its "
        "folder to TUNERY_IMPORT_ROOTS")


def host_path(source: str, field: str, *, roots: Sequence[Path], hint: str = "") -> Path:
    """`source` as an existing absolute path under one of `roots` on this host, or the error a client can act on:
    INVALID_ARGUMENT (relative, NUL bytes, too long, a loop, not a directory on the way), PERMISSION_DENIED
    (outside the roots, also through a symlink: decided before anything there is looked at), NOT_FOUND (nothing
    there), FAILED_PRECONDITION (there, but this service may not read it)."""
    if not source:
        raise InvalidArgument.field(field, "is empty: give an absolute path on the service's host")
    shown = source if len(source) <= 120 else source[:117] + "..."
    if "\x00" in source:
        raise InvalidArgument.field(field, f"{shown!r} holds a NUL byte")
    path = Path(source)
    if not path.is_absolute():
        raise InvalidArgument.field(field, f"{shown!r} must be an absolute path{hint}")
    if len(os.fsencode(source)) >= PATH_MAX:
        raise InvalidArgument.field(field, f"a path of {len(source):,} characters: the limit is {PATH_MAX - 1:,} bytes")
    long = next((p for p in path.parts if len(os.fsencode(p)) > NAME_MAX), None)
    if long is not None:
        raise InvalidArgument.field(field, f"the component {long[:40]!r}... is {len(long):,} characters: the limit "
                                    f"is {NAME_MAX} bytes")
    if outside(Path(os.path.normpath(path)), roots):  # lexically, before the filesystem is touched
        raise denied(field, shown, roots)
    try:
        path.stat()
        if outside(path.resolve(strict=True), roots):  # a symlink inside a root that points out of it
            raise denied(field, shown, roots)
    except FileNotFoundError:
        raise NotFound(f"{field}: {shown} does not exist on this host") from None
    except PermissionError:
        raise FailedPrecondition(f"{field}: {shown} exists but this service may not read it (permissions)") from None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise NotFound(f"{field}: {shown} does not exist on this host (a part of it is a file)") from None
        raise InvalidArgument.field(field, f"{shown}: {os.strerror(e.errno) if e.errno else e}") from None
    return path
