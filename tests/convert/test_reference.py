"""Image reference parsing (docker/distribution rules) and the loopback test."""

import pytest

from nydus_py.convert.errors import ConvertError
from nydus_py.convert.reference import ImageRef, is_loopback, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,want", [
    ("busybox", ImageRef("docker.io", "library/busybox", "latest")),
    ("docker.io/busybox:1.36", ImageRef("docker.io", "library/busybox", "1.36")),
    ("index.docker.io/user/app", ImageRef("docker.io", "user/app", "latest")),
    ("user/app:v1", ImageRef("docker.io", "user/app", "v1")),
    ("127.0.0.1:5000/test/app:v1", ImageRef("127.0.0.1:5000", "test/app", "v1")),
    ("localhost/app", ImageRef("localhost", "app", "latest")),
    ("docker://ghcr.io/o/r:1.2.3", ImageRef("ghcr.io", "o/r", "1.2.3")),
    (f"reg.example.com/a/b/c@{D}", ImageRef("reg.example.com", "a/b/c", None, D)),
    (f"reg:1/a:t@{D}", ImageRef("reg:1", "a", "t", D)),
    ("[::1]:5000/x:y", ImageRef("[::1]:5000", "x", "y")),
    ("reg.io/a__b/c-d.e:T_1", ImageRef("reg.io", "a__b/c-d.e", "T_1")),
])
def test_parse(text, want):
    assert parse_reference(text) == want


def test_properties():
    r = parse_reference("busybox")
    assert r.host == "index.docker.io" and r.reference == "latest" and str(r) == "docker.io/library/busybox:latest"
    r = parse_reference(f"127.0.0.1:5000/a@{D}")
    assert r.host == "127.0.0.1:5000" and r.reference == D and str(r) == f"127.0.0.1:5000/a@{D}"
    assert r.with_tag("t") == ImageRef("127.0.0.1:5000", "a", "t")


@pytest.mark.parametrize("text", [
    "", "UPPER/case", "reg.io/a//b", "reg.io/a:bad tag", "reg.io/a@sha256:123", "reg.io/a@md5:" + "0" * 32,
    "http://reg.io/a", "reg.io/", "reg.io/a/", "reg.io/-a", "reg.io/a:" + "t" * 200, "x" * 5000,
    "bad_host:5000/a", "reg.io/a:-tag",
])
def test_rejects(text):
    with pytest.raises(ConvertError, match="invalid image reference"):
        parse_reference(text)


@pytest.mark.parametrize("host,want", [("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:1", True),
                                       ("[::1]:5000", True), ("reg.io", False), ("10.0.0.1:5000", False)])
def test_loopback(host, want):
    assert is_loopback(host) is want
