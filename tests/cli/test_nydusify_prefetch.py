"""nydusify-py convert --prefetch-patterns (STDIN) / --prefetch-files FILE: the paths reach the
build options; relative paths are refused."""

import argparse
import io
import sys

import pytest

from nydus_py.cli.nydusify import _prefetch_patterns
from nydus_py.convert.converter import ConvertOptions, build_options
from nydus_py.convert.errors import ConvertError


def ns(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"prefetch_files": None, "prefetch_patterns": False, "prefetch_dir": None, **kw})


def test_patterns_from_stdin_and_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"/usr/bin/app\n\n  /etc/app.conf \n")))
    assert _prefetch_patterns(ns(prefetch_patterns=True)) == [b"/usr/bin/app", b"/etc/app.conf"]
    f = tmp_path / "list"
    f.write_bytes(b"/lib/x.so\n/bin/sh\n")
    assert _prefetch_patterns(ns(prefetch_files=str(f))) == [b"/lib/x.so", b"/bin/sh"]
    assert _prefetch_patterns(ns()) == []
    f.write_bytes(b"/ok\nrelative/path\n")
    with pytest.raises(ConvertError, match="absolute"):
        _prefetch_patterns(ns(prefetch_files=str(f)))


def test_patterns_reach_the_build_options():
    opts = ConvertOptions(source="r/a:1", target="r/b:1", prefetch_patterns=[b"/a", b"/b/c"])
    assert build_options(opts).prefetch_paths == [b"/a", b"/b/c"]


def test_prefetch_dir_is_one_path_and_conflicts_with_patterns():
    assert _prefetch_patterns(ns(prefetch_dir="/usr/lib")) == [b"/usr/lib"]
    with pytest.raises(ConvertError, match="--prefetch-dir conflicts with --prefetch-patterns"):
        _prefetch_patterns(ns(prefetch_dir="/usr/lib", prefetch_patterns=True))
    with pytest.raises(ConvertError, match="must be absolute"):
        _prefetch_patterns(ns(prefetch_dir="usr/lib"))
