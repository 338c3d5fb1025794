"""Validation of names and object keys: a fixed character set, no '..', no absolute paths."""

from __future__ import annotations

import re

from services.core.errors import InvalidArgument

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_RE = re.compile(r"^[A-Za-z0-9._/-]{1,1024}$")


def validate_name(name: str, field: str = "name") -> str:
    if not name:
        raise InvalidArgument.field(field, "is required")
    if ".." in name or not NAME_RE.match(name):
        raise InvalidArgument.field(
            field,
            f"{name!r} is not a valid name: use 1-100 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'",
        )
    return name


def validate_id(value: str, field: str = "id") -> str:
    if not value or ".." in value or not ID_RE.match(value):
        raise InvalidArgument.field(
            field, f"{value!r} is not a valid id: use 1-128 letters, digits, '.', '_' or '-', and no '..'"
        )
    return value


def validate_key(key: str) -> str:
    """An object key relative to the project prefix."""
    parts = key.split("/")
    if (
        not KEY_RE.match(key)
        or key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise InvalidArgument.field("key", f"{key!r} is not a valid object key (no '..', no absolute paths, [A-Za-z0-9._/-])")
    return key


def validate_relpath(path: str, field: str = "path") -> str:
    """A file path inside an artifact."""
    try:
        return validate_key(path)
    except InvalidArgument:
        raise InvalidArgument.field(field, f"{path!r} is not a safe relative path inside an artifact") from None
