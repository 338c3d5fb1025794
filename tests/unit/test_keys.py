import pytest

from services.core.errors import InvalidArgument
from services.core.keys import validate_id, validate_key, validate_name


@pytest.mark.parametrize("name", ["llama", "tiny-llama", "a.b_c-1", "x" * 100])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a..b", "/abs", "UPPER", "sp ace", "-lead", "x" * 101, "a/b", "é"])
def test_bad_names(name):
    with pytest.raises(InvalidArgument) as e:
        validate_name(name, "spec.name")
    assert e.value.violations[0].field == "spec.name"


@pytest.mark.parametrize("key", ["projects/p/blobs/sha256/ab/abcd", "a", "a/b.c/d-e_f"])
def test_good_keys(key):
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a/b/", "a b", "a\\b", "x" * 1025])
def test_bad_keys(key):
    with pytest.raises(InvalidArgument):
        validate_key(key)


@pytest.mark.parametrize("value", ["job-1", "Import.Key_2"])
def test_ids(value):
    assert validate_id(value) == value


@pytest.mark.parametrize("value", ["", "../x", "a/b", "x" * 129])
def test_bad_ids(value):
    with pytest.raises(InvalidArgument):
        validate_id(value)
