"""The storage tests' registry rigs (Debian docker-registry: plain, basic, token), plus skopeo."""

import pytest

from tests.conftest import require_tool
from tests.storage.conftest import (  # noqa: F401  (fixtures)
    basic_registry,
    plain_registry,
    registry_bin,
    registry_root,
    token_registry,
    token_server,
)


@pytest.fixture(scope="session")
def skopeo() -> str:
    return require_tool("skopeo")
