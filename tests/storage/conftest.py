"""Registry fixtures: one of each rig per test session, all stopped at teardown."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool

from . import registry_rig as rig


@pytest.fixture(scope="session")
def registry_bin() -> str:
    return require_tool("docker-registry")


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registries")


@pytest.fixture(scope="session")
def plain_registry(registry_bin: str, registry_root: Path) -> Iterator[rig.Registry]:
    reg = rig.plain_registry(registry_bin, registry_root)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def basic_registry(registry_bin: str, registry_root: Path) -> Iterator[rig.Registry]:
    htpasswd = rig.htpasswd_line(require_tool("htpasswd"))
    reg = rig.basic_registry(registry_bin, registry_root, htpasswd)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_server() -> Iterator[rig.TokenServer]:
    ts = rig.TokenServer(rig.make_certs()).start()
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def token_registry(registry_bin: str, registry_root: Path, token_server: rig.TokenServer) -> Iterator[rig.Registry]:
    reg = rig.token_registry(registry_bin, registry_root, token_server)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def mirror_registry(registry_bin: str, registry_root: Path, plain_registry: rig.Registry) -> Iterator[rig.Registry]:
    reg = rig.mirror_registry(registry_bin, registry_root, plain_registry)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def redirect_registry(registry_bin: str, registry_root: Path,
                      plain_registry: rig.Registry) -> Iterator[tuple[rig.Registry, rig.RangeServer]]:
    reg, target = rig.redirect_registry(registry_bin, registry_root, plain_registry)
    yield reg, target
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(registry_bin: str, registry_root: Path) -> Iterator[tuple[rig.Registry, Path]]:
    reg, ca = rig.tls_registry(registry_bin, registry_root)
    yield reg, ca
    reg.stop()
