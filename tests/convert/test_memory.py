"""release_free_memory: malloc_trim where glibc has it; elsewhere a logged, counted no-op."""

import ctypes
import logging

import pytest

from nydus_py.convert import memory


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(memory, "_looked", False)
    monkeypatch.setattr(memory, "_trim", None)
    return memory


def test_trims_with_glibc(fresh):
    before = fresh.trims
    assert fresh.release_free_memory() is True
    assert fresh.trims == before + 1


def test_without_malloc_trim_it_is_logged_once_and_counted(fresh, monkeypatch, caplog):
    def no_libc(*_a, **_k):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    before = fresh.unavailable
    with caplog.at_level(logging.INFO, logger="nydus_py.convert.memory"):
        assert fresh.release_free_memory() is False
        assert fresh.release_free_memory() is False
    assert fresh.unavailable == before + 2
    assert [r.message for r in caplog.records].count(
        "malloc_trim is not available (no such library): freed memory stays with the allocator") == 1
