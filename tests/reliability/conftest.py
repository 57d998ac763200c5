"""The reliability sweep uses the storage tests' real registry rigs."""

from tests.storage.conftest import plain_registry, registry_bin, registry_root  # noqa: F401
