"""Paths on the service's own host that a request names (a model directory, a dataset file): checked before any
filesystem call can raise, so a bad path is INVALID_ARGUMENT naming the field, never INTERNAL."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from services.core.errors import FailedPrecondition, InvalidArgument, NotFound

PATH_MAX = 4096   # Linux's limits (limits.h): a whole path, and one component
NAME_MAX = 255


def host_path(source: str, field: str, *, hint: str = "") -> Path:
    """`source` as an existing absolute path on this host, or the error a client can act on: INVALID_ARGUMENT
    (relative, NUL bytes, too long, a loop, not a directory on the way), NOT_FOUND (nothing there),
    FAILED_PRECONDITION (there, but this service may not read it)."""
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
    try:
        path.stat()
    except FileNotFoundError:
        raise NotFound(f"{field}: {shown} does not exist on this host") from None
    except PermissionError:
        raise FailedPrecondition(f"{field}: {shown} exists but this service may not read it (permissions)") from None
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            raise NotFound(f"{field}: {shown} does not exist on this host (a part of it is a file)") from None
        raise InvalidArgument.field(field, f"{shown}: {os.strerror(e.errno) if e.errno else e}") from None
    return path
