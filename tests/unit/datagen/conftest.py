import pytest

from tests.unit.datagen.helpers import ChatMLWhitespace


@pytest.fixture
def tok():
    return ChatMLWhitespace()
