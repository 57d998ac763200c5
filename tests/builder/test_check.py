"""check_image / describe_image / tree_from_image on damaged bootstraps: reports, never crashes."""

import contextlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus_py.builder.build import build_image
from nydus_py.builder.check import check_image, describe_image
from nydus_py.builder.export import write_tar
from nydus_py.builder.merge import tree_from_image
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_tar
from nydus_py.rafs.errors import FormatError
from nydus_py.rafs.loader import open_bytes
from tests.conftest import NYDUS_FIXTURES

from .treeutil import make_tar, member

FIXTURE_BOOT = (NYDUS_FIXTURES / "v5-blake3-lz4.boot").read_bytes()
FIXTURE_BLOBS = str(NYDUS_FIXTURES / "blobs")


@pytest.fixture(scope="module")
def v6_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    d = tmp_path_factory.mktemp("v6")
    tar = make_tar(
        [
            member("a/b/c", data=os.urandom(9000)),
            member("a/h", data=b"x"),
            member("a/l", linkname="a/h", kind=b"1"),
            member("s", kind=b"2", linkname="/a"),
            member("x", data=b"attrs", pax={"SCHILY.xattr.user.k": "v" * 40}),
        ]
    )
    root = tree_from_tar(io.BytesIO(tar))
    build_image(root, str(d / "boot"), str(d / "blobs"), BuildOptions(chunk_size=0x1000))
    return (d / "boot").read_bytes(), str(d / "blobs")


def exercise(data: bytes, blob_dir: str) -> None:
    try:
        img = open_bytes(data)
    except FormatError:
        return
    report = check_image(img, blob_dir)  # never raises FormatError: problems are collected
    assert report.ok == (report.error_count == 0)
    for fn in (lambda: describe_image(img), lambda: write_tar(tree_from_image(img, blob_dir, rewrite=True), io.BytesIO())):
        with contextlib.suppress(FormatError):
            fn()


def test_intact_images_are_clean(v6_image: tuple[bytes, str]) -> None:
    for data, blobs in ((FIXTURE_BOOT, FIXTURE_BLOBS), v6_image):
        report = check_image(open_bytes(data), blobs)
        assert report.ok, report.errors
        assert report.chunks_verified > 0 and report.blobs_checked == 1


def test_missing_blob_dir_entries(tmp_path: Path, v6_image: tuple[bytes, str]) -> None:
    report = check_image(open_bytes(v6_image[0]), str(tmp_path))
    assert not report.ok and "not found" in report.errors[0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.booleans(), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_bootstraps(v6_image: tuple[bytes, str], which: bool, flips: list[tuple[int, int]]) -> None:
    base, blobs = (FIXTURE_BOOT, FIXTURE_BLOBS) if which else v6_image
    data = bytearray(base)
    for pos, value in flips:
        data[pos % len(data)] = value
    exercise(bytes(data), blobs)
