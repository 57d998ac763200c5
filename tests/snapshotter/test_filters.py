"""containerd's filter syntax as the snapshotter parses it."""

import pytest

from nydus_py.snapshotter import filters
from nydus_py.snapshotter.errors import InvalidArgument
from nydus_py.snapshotter.filters import Selector


def adaptor(fields: dict[tuple[str, ...], str]):
    return lambda path: (fields[tuple(path)], True) if tuple(path) in fields else ("", False)


def test_parse_shapes():
    assert filters.parse("") == ()
    assert filters.parse('labels."containerd.io/snapshot.ref"==sha256:ab,parent=="1/2/x y"') == (
        Selector(("labels", "containerd.io/snapshot.ref"), "==", "sha256:ab"),
        Selector(("parent",), "==", "1/2/x y"),
    )
    assert filters.parse(" kind == active , labels.a.b ") == (
        Selector(("kind",), "==", "active"), Selector(("labels", "a", "b")))
    assert filters.parse("name~=/^a\\/b$/") == (Selector(("name",), "~=", "^a/b$"),)
    assert filters.parse("name~=|x,y|") == (Selector(("name",), "~=", "x,y"),)
    assert filters.parse('name=="tab\\tquote\\""') == (Selector(("name",), "==", 'tab\tquote"'),)


@pytest.mark.parametrize("bad", ['name=="open', "name==", "==x", "name==a b", "name,,kind", "name=", 'name=="\\q"',
                                 "labels.", "name==a,"])
def test_malformed_filters_are_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        filters.parse(bad)


def test_matching_rules():
    a = adaptor({("name",): "sha256:x", ("labels", "team"): "a"})
    f = filters.parse_all
    assert filters.matches([], a)
    assert filters.matches(f(["name==sha256:x"]), a)
    assert not filters.matches(f(["name==sha256:y"]), a)
    assert filters.matches(f(["labels.team"]), a) and not filters.matches(f(["labels.other"]), a)
    assert filters.matches(f(["labels.other!=z"]), a)  # != holds for an absent field, as in containerd
    assert not filters.matches(f(["labels.other==z"]), a)
    assert filters.matches(f(["name~=^sha256"]), a) and not filters.matches(f(["name~=[unclosed"]), a)
    assert filters.matches(f(["name==nope", "labels.team==a"]), a)  # any of several
    assert not filters.matches(f(["name==sha256:x,labels.team==b"]), a)  # all within one
