"""Request paths on the service's host: every malformed one is a request error naming the field (the fuzzer's
OSError "File name too long" reached INTERNAL from ImportModel and ImportDataset), and nothing outside the import
roots is read, listed, or even told apart from what is not there (an authenticated client could import any
server-readable .jsonl and download it again; a wrong model path listed /proc/self)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.core.artifacts import ArtifactStore
from services.core.errors import InvalidArgument, NotFound, PermissionDenied
from services.core.hostpaths import host_path
from services.core.modeldir import quick_check
from services.core.store import LocalObjectStore
from services.registry.service import RegistryService, RegistrySettings
from services.registry.spec import ImportDatasetSpec, ImportModelSpec
from tests.fakes import FakeRunner

pytestmark = pytest.mark.unit
EVERYWHERE = [Path("/")]


def registry(tmp_path: Path, roots: str) -> RegistryService:
    artifacts = ArtifactStore(LocalObjectStore(tmp_path / "store"), "p")
    return RegistryService(artifacts, FakeRunner(artifacts), RegistrySettings(import_roots=roots))


@pytest.mark.parametrize("source, error, words", [
    ("/" + "a" * 100000, InvalidArgument, "the limit is 4,095 bytes"),
    ("/" + "a" * 300, InvalidArgument, "the limit is 255 bytes"),
    ("/tmp/" + "b/" * 2100, InvalidArgument, "the limit is 4,095 bytes"),
    ("/tmp/x\x00y", InvalidArgument, "NUL byte"),
    ("relative/path", InvalidArgument, "absolute path"),
    ("", InvalidArgument, "is empty"),
    ("/no/such/place", NotFound, "does not exist"),
])
def test_malformed_paths_are_request_errors(source, error, words, tmp_path):
    with pytest.raises(error, match=words) as e:
        host_path(source, "spec.source", roots=EVERYWHERE)
    assert "spec.source" in str(e.value)
    with pytest.raises(error):  # both registry imports go through it
        quick_check(source, False, EVERYWHERE)
    with pytest.raises(error):
        registry(tmp_path, "/")._check_dataset(ImportDatasetSpec(source=source, name="d"))


def test_a_file_in_the_middle_and_a_loop(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotFound, match="a part of it is a file"):
        host_path(str(tmp_path / "f" / "g"), "spec.source", roots=EVERYWHERE)
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(InvalidArgument, match="symbolic links"):
        host_path(str(tmp_path / "loop"), "spec.source", roots=EVERYWHERE)


def test_paths_outside_the_roots_are_refused_without_telling_what_is_there(tmp_path):
    root = tmp_path / "imports"
    root.mkdir()
    (root / "train.jsonl").write_text('{"a": 1}\n')
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"password": 1}\n')
    roots = [root.resolve()]
    assert host_path(str(root / "train.jsonl"), "spec.source", roots=roots) == root / "train.jsonl"
    assert host_path(str(root), "spec.source", roots=roots) == root
    # an existing file and a missing one outside the roots get the same answer: existence does not leak
    answers = []
    for outside in (secret, tmp_path / "missing.jsonl", root / ".." / "secret.jsonl", Path("/proc/self")):
        with pytest.raises(PermissionDenied, match="outside this stack's import roots") as e:
            host_path(str(outside), "spec.source", roots=roots)
        answers.append(str(e.value).replace(str(outside), "<path>"))
    assert len(set(answers)) == 1 and "upload it" in answers[0]
    # a symlink inside a root that points out of it
    os.symlink(secret, root / "link.jsonl")
    with pytest.raises(PermissionDenied):
        host_path(str(root / "link.jsonl"), "spec.source", roots=roots)
    # a root that is a prefix of another folder's name does not open that folder
    (tmp_path / "imports-other").mkdir()
    (tmp_path / "imports-other" / "x.jsonl").write_text("{}\n")
    with pytest.raises(PermissionDenied):
        host_path(str(tmp_path / "imports-other" / "x.jsonl"), "spec.source", roots=roots)
    with pytest.raises(PermissionDenied):  # no roots: no server paths at all
        host_path(str(root / "train.jsonl"), "spec.source", roots=[])


def test_the_registry_refuses_both_imports_outside_its_roots(tmp_path):
    root = tmp_path / "imports"
    root.mkdir()
    svc = registry(tmp_path, str(root))
    (tmp_path / "d.jsonl").write_text("{}\n")
    with pytest.raises(PermissionDenied):
        svc._check_dataset(ImportDatasetSpec(source=str(tmp_path / "d.jsonl"), name="d"))
    with pytest.raises(PermissionDenied):
        svc._check_model(ImportModelSpec(source="/proc/self", name="m"))
    (root / "d.jsonl").write_text("{}\n")
    svc._check_dataset(ImportDatasetSpec(source=str(root / "d.jsonl"), name="d"))


def test_a_folder_without_config_json_is_not_listed(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "private-notes.txt").write_text("x")
    with pytest.raises(InvalidArgument, match="no config.json") as e:
        quick_check(str(tmp_path / "m"), False, [tmp_path])
    assert "private-notes" not in str(e.value)


def test_the_embedded_default_roots_are_home_and_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNERY_IMPORT_ROOTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert {Path.home().resolve(), tmp_path.resolve()} <= set(RegistrySettings().roots())
    monkeypatch.setenv("TUNERY_IMPORT_ROOTS", f"/imports{os.pathsep}/data")
    assert RegistrySettings().roots() == [Path("/imports"), Path("/data")]


def test_a_root_reached_through_a_symlink_holds_paths_written_either_way(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "d.jsonl").write_text("{}\n")
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.setenv("TUNERY_IMPORT_ROOTS", str(tmp_path / "link"))
    roots = RegistrySettings().roots()
    for written in (tmp_path / "link" / "d.jsonl", tmp_path / "real" / "d.jsonl"):
        assert host_path(str(written), "spec.source", roots=roots) == written
