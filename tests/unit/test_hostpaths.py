"""Request paths on the service's host: every malformed one is a request error naming the field (the fuzzer's
OSError "File name too long" reached INTERNAL from ImportModel and ImportDataset)."""

from __future__ import annotations

import os

import pytest

from services.core.errors import InvalidArgument, NotFound
from services.core.hostpaths import host_path
from services.core.modeldir import quick_check
from services.registry.service import RegistryService
from services.registry.spec import ImportDatasetSpec


@pytest.mark.parametrize("source, error, words", [
    ("/" + "a" * 100000, InvalidArgument, "the limit is 4,095 bytes"),
    ("/" + "a" * 300, InvalidArgument, "the limit is 255 bytes"),
    ("/tmp/" + "b/" * 2100, InvalidArgument, "the limit is 4,095 bytes"),
    ("/tmp/x\x00y", InvalidArgument, "NUL byte"),
    ("relative/path", InvalidArgument, "absolute path"),
    ("", InvalidArgument, "is empty"),
    ("/no/such/place", NotFound, "does not exist"),
])
def test_malformed_paths_are_request_errors(source, error, words):
    with pytest.raises(error, match=words) as e:
        host_path(source, "spec.source")
    assert "spec.source" in str(e.value)
    with pytest.raises(error):  # both registry imports go through it
        quick_check(source, False)
    with pytest.raises(error):
        RegistryService._check_dataset(ImportDatasetSpec(source=source, name="d"))


def test_a_file_in_the_middle_and_a_loop(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotFound, match="a part of it is a file"):
        host_path(str(tmp_path / "f" / "g"), "spec.source")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(InvalidArgument, match="symbolic links"):
        host_path(str(tmp_path / "loop"), "spec.source")
