"""LayerStack: one blob per layer, chunks deduplicated across layers, merged bootstrap equal to
the layers stacked with OCI whiteouts (checked through a real reader and every chunk)."""

import io
import os
import random
import stat

import pytest

from nydus_py.builder.blob_writer import BlobWriter
from nydus_py.builder.check import check_image
from nydus_py.builder.merge import merge_layers
from nydus_py.builder.options import BuildOptions
from nydus_py.builder.sources import tree_from_tar
from nydus_py.builder.tree import FileData, walk
from nydus_py.convert.stack import LayerStack
from nydus_py.rafs import open_bootstrap
from nydus_py.rafs.chunkdata import read_file_range
from nydus_py.rafs.errors import FormatError
from nydus_py.storage.localfs import LocalBlobDir

from .ociimage import Entry, make_tar

CS = 0x10000


def layers(seed: int) -> list[list[Entry]]:
    rng = random.Random(seed)
    shared = rng.randbytes(3 * CS + 100)
    return [
        [Entry("a", "dir", mode=0o755), Entry("a/shared", data=shared), Entry("a/gone", data=rng.randbytes(5000)),
         Entry("d", "dir"), Entry("d/x", data=b"x"), Entry("o", "dir"), Entry("o/old", data=b"old"),
         Entry("keep", data=rng.randbytes(CS))],
        [Entry("a", "dir", mode=0o700), Entry("a/.wh.gone"), Entry("b", "dir"), Entry("b/copy", data=shared),
         Entry(".wh.d"), Entry("o", "dir"), Entry("o/.wh..wh..opq"), Entry("o/new", data=b"new"),
         Entry("h1", data=b"linked" * 1000), Entry("h2", "link", target="h1")],
        [Entry("d", "dir", mode=0o711), Entry("d/again", data=rng.randbytes(2 * CS)), Entry("empty", data=b""),
         Entry("s", "symlink", target="a/shared")],
    ]


def expected(tars: list[bytes]) -> dict[bytes, tuple[int, bytes]]:
    root = merge_layers([tree_from_tar(io.BytesIO(t)) for t in tars])
    out = {}
    for path, node in walk(root):
        data = b""
        if node.is_reg and isinstance(node.data, FileData) and node.data.size:
            with node.data.open() as f:
                data = f.read()
        elif node.is_symlink:
            data = node.symlink or b""
        out[path] = (node.mode, data)
    return out


def actual(boot: str, blob_dir: str) -> dict[bytes, tuple[int, bytes]]:
    out = {}
    src = LocalBlobDir(blob_dir)
    with open_bootstrap(boot) as img:
        report = check_image(img, blob_dir)
        assert report.ok, report.errors
        stack = [(img.root_ino, b"/")]
        while stack:
            ino, path = stack.pop()
            a = img.getattr(ino)
            data = b""
            if stat.S_ISREG(a.mode):
                data = read_file_range(src, img, ino, 0, a.size)
            elif stat.S_ISLNK(a.mode):
                data = img.readlink(ino)
            out[path] = (a.mode, data)
            if stat.S_ISDIR(a.mode):
                for e in img.readdir(ino):
                    stack.append((e.ino, path.rstrip(b"/") + b"/" + e.name))
    return out


@pytest.mark.parametrize("fs_version", [6, 5])
def test_stack_equals_merged_layers_and_dedups(tmp_path, fs_version):
    tars = [make_tar(entries) for entries in layers(1)]
    opts = BuildOptions(fs_version=fs_version, chunk_size=CS)
    stack = LayerStack(opts, str(tmp_path / "blobs"))
    seen: list[int] = []
    results = []
    for t in tars:
        f = tmp_path / f"layer{len(results)}.tar"
        f.write_bytes(t)
        with open(f, "rb") as fh:
            results.append(stack.add_layer(fh, seen.append))
    res = stack.finish(str(tmp_path / "image.boot"))
    got = actual(str(tmp_path / "image.boot"), str(tmp_path / "blobs"))
    want = expected(tars)
    assert got == want
    assert b"/a/gone" not in got and b"/d/x" not in got and sorted(p for p in got if p.startswith(b"/o/")) == [b"/o/new"]
    # layer 2's copy of `shared` is entirely made of layer 1's chunks
    assert results[1].deduplicated >= 4
    assert sum(seen) == sum(r.file_bytes for r in results)
    assert res.blob_ids == [r.blob.blob_id for r in results if r.blob is not None]  # layer order
    for bid in res.blob_ids:
        assert os.path.getsize(tmp_path / "blobs" / bid) > 0
    with open_bootstrap(str(tmp_path / "image.boot")) as img:
        assert img.version == fs_version
        h1 = img.getattr(next(e.ino for e in img.readdir(img.root_ino) if e.name == b"h1"))
        assert h1.nlink == 2


def test_fully_deduplicated_or_whited_out_layers_add_no_blob(tmp_path):
    data = random.Random(5).randbytes(2 * CS)
    tars = [make_tar([Entry("f", data=data)]),
            make_tar([Entry("g", data=data)]),  # nothing new: no blob
            make_tar([Entry(".wh.f"), Entry(".wh.g"), Entry("e", data=b"")])]  # all data gone from the image
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    results = []
    for t in tars:
        results.append(stack.add_layer(io.BytesIO(t)))
    assert results[0].blob is not None and results[1].blob is None and results[1].deduplicated == 2
    assert results[2].blob is None
    res = stack.finish(str(tmp_path / "boot"))
    assert res.blob_ids == []  # layer 1's blob is not referenced any more: nothing to push
    assert actual(str(tmp_path / "boot"), str(tmp_path / "blobs"))[b"/e"] == (stat.S_IFREG | 0o644, b"")


def test_hostile_layer_is_a_format_error(tmp_path):
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path))
    with pytest.raises(FormatError, match="escapes the layer root"):
        stack.add_layer(io.BytesIO(make_tar([Entry("../x", data=b"x")])))
    with pytest.raises(ValueError, match="no layers"):
        stack.finish(str(tmp_path / "boot"))
    with pytest.raises(ValueError, match="blob_id"):
        LayerStack(BuildOptions(blob_id="0" * 64), str(tmp_path))


def test_prefetch_patterns_go_first_in_each_layer_blob(tmp_path, caplog):
    """nydusify --prefetch-patterns: each layer's blob starts with its listed files, in list order;
    the merged bootstrap's prefetch table names them all; no warnings about other layers' paths."""
    rng = random.Random(9)
    l0 = [Entry(f"f{k}", data=rng.randbytes(3000 + k)) for k in range(6)]
    l1 = [Entry("d", "dir")] + [Entry(f"d/g{k}", data=rng.randbytes(2000 + k)) for k in range(6)]
    want = [b"/d/g4", b"/f5", b"/f0/", b"/d/g1", b"/f3"]
    stack = LayerStack(BuildOptions(chunk_size=CS, prefetch_paths=want), str(tmp_path / "blobs"))
    with caplog.at_level("WARNING"):
        results = [stack.add_layer(io.BytesIO(make_tar(entries))) for entries in (l0, l1)]
        stack.finish(str(tmp_path / "boot"))
    assert not [r for r in caplog.records if "prefetch" in r.getMessage()]
    from nydus_py.storage.prefetch import resolve_path

    with open_bootstrap(str(tmp_path / "boot")) as img:
        table = img.prefetch_table()
        assert table == [resolve_path(img, p.rstrip(b"/")) for p in want]
        for layer, names in ((0, [b"/f5", b"/f0", b"/f3"]), (1, [b"/d/g4", b"/d/g1"])):
            blob = results[layer].blob
            assert blob is not None
            offsets = [img.chunks(resolve_path(img, n))[0].compressed_offset for n in names]
            assert offsets[0] == 0 and offsets == sorted(offsets)  # first, in list order
            others = [c.compressed_offset for _p, ino in img.walk() if stat.S_ISREG(img.getattr(ino).mode)
                      for c in img.chunks(ino) if c.blob_index == blob.index and c.compressed_offset not in offsets]
            assert min(others) > max(offsets)


def test_finished_stack_refuses_more_layers(tmp_path):
    """finish() lets go of the dedup map and the layer trees, so the stack is spent."""
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    stack.add_layer(io.BytesIO(make_tar([Entry("a", data=b"a" * 100)])))
    stack.finish(str(tmp_path / "boot"))
    assert len(stack.dedup) == 0 and stack.layers == []
    with pytest.raises(RuntimeError, match="finished"):
        stack.add_layer(io.BytesIO(make_tar([Entry("b", data=b"b")])))
    with pytest.raises(RuntimeError, match="finished"):
        stack.finish(str(tmp_path / "boot2"))


def _sequential_blob(stack: LayerStack, tar: bytes, blob_dir: str) -> tuple[str | None, list[bytes]]:
    """The oracle: one layer built the straightforward way, deduplicating against the chunks the
    stack holds while it writes (what `add_layer` did before layers could be prepared apart),
    its files' data in archive order (as upstream's tarball builder dumps each entry's data
    while it parses the tar)."""
    from nydus_py.builder.v6_writer import plan_v6

    tree = tree_from_tar(io.BytesIO(tar))
    order = sorted(plan_v6(tree, stack.opts).data_order(), key=lambda n: tree.a[n])  # offset in the tar
    with BlobWriter(blob_dir, stack.opts, blob_index=len(stack.blobs), existing=stack.dedup) as w:
        chunks = w.add_files([tree.file_data(n) for n in order])
        blob = w.finish()
    return (blob.blob_id if blob else None), chunks


@pytest.mark.parametrize("schedule,rewrites", [
    ("P3 P1 P4 P2 P0 C0 C1 C2 C3 C4", 3),  # upper layers first: 1, 3, 4 store what lower ones hold
    ("P0 P1 C0 P2 P3 C1 P4 C2 C3 C4", 0),  # lower ones committed or being prepared: found there
    ("P0 P1 P2 P3 P4 C0 C1 C2 C3 C4", 0),  # all held: each finds the chunks of those below
    ("P0 P2 C0 P4 P1 C1 C2 P3 C3 C4", 0),
    ("P1 P0 C0 C1 P2 P3 P4 C2 C3 C4", 1),  # 1 before 0: 1's held blob is written again
])
def test_layers_prepared_out_of_order_equal_a_sequential_build(tmp_path, monkeypatch, schedule, rewrites):
    """Layers prepared at once (the converter's parallel builds), then committed in order, give
    the very blobs and chunk records of building them one after the other, also when a layer
    repeats chunks of the layers below (found while preparing when that layer was committed
    already, else its held blob is written again without them)."""
    rng = random.Random(11)
    common, only2 = rng.randbytes(3 * CS), rng.randbytes(CS + 3)
    # archive order is not tree order (b before a, a file of /z before /y): the blobs follow the archive
    tars = [make_tar([Entry("z", "dir"), Entry("z/q", data=rng.randbytes(CS + 5)), Entry("b", data=rng.randbytes(2 * CS + 7)),
                      Entry("a", data=common + rng.randbytes(CS)), Entry("y", data=rng.randbytes(CS - 9))]),
            make_tar([Entry("c", data=rng.randbytes(CS) + common), Entry("d", data=common[:CS])]),  # dups of 0
            make_tar([Entry("e", data=only2)]),  # nothing shared
            make_tar([Entry("f", data=common)]),  # nothing new: no blob
            make_tar([Entry("g", data=only2 + b"!")])]  # chunks of the third blob (index 2)
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"))
    oracle = tmp_path / "oracle"
    prepared = {}
    rewritten: list[int] = []  # commits that wrote a held blob again
    real = BlobWriter.stored_chunks
    monkeypatch.setattr(BlobWriter, "stored_chunks", lambda w: rewritten.append(1) or real(w))
    for step in schedule.split():
        i = int(step[1])
        if step[0] == "P":
            prepared[i] = stack.prepare_layer(io.BytesIO(tars[i]), position=i)
            continue
        want_id, want_chunks = _sequential_blob(stack, tars[i], str(oracle))
        res = stack.commit_layer(prepared[i])
        assert (res.blob.blob_id if res.blob else None) == want_id, i
        if want_id is not None:
            assert (tmp_path / "blobs" / want_id).read_bytes() == (oracle / want_id).read_bytes()
        tree = stack.layers[-1]
        got = sorted(tree.chunk_bytes(n) for n in range(len(tree)) if tree.chunk_bytes(n))
        assert got == sorted(c for c in want_chunks if c), i
    assert len(stack.blobs) == 4
    assert len(rewritten) == rewrites
    stack.finish(str(tmp_path / "image.boot"))
    assert actual(str(tmp_path / "image.boot"), str(tmp_path / "blobs")) == expected(tars)


@pytest.mark.parametrize("durable", [True, False])
def test_blobs_are_fsynced_only_when_durable(tmp_path, monkeypatch, durable):
    """convert's stack (durable=False) uploads and deletes its blobs: no fsync on the way to the
    upload; a durable stack fsyncs each blob it names, the rewritten ones too."""
    import nydus_py.builder.blob_writer as bw

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(bw.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / "blobs"), durable=durable)
    tars = [make_tar(entries) for entries in layers(5)]
    results = [stack.add_layer(io.BytesIO(t)) for t in tars]
    named = sum(r.blob is not None for r in results)
    assert named >= 2
    assert len(synced) == (named if durable else 0)


def test_layers_merged_as_they_commit_give_the_same_bootstrap(tmp_path):
    """The converter merges each committed layer into the image tree while the layers above
    build (`merge_committed`); `finish` then writes the bootstrap of merging them all at once."""
    tars = [make_tar(entries) for entries in layers(7)]
    boots = []
    for early in (False, True):
        stack = LayerStack(BuildOptions(chunk_size=CS), str(tmp_path / f"blobs-{early}"))
        for t in tars:
            stack.add_layer(io.BytesIO(t))
            if early:
                stack.merge_committed()
        boot = tmp_path / f"boot-{early}"
        stack.finish(str(boot))
        boots.append(boot.read_bytes())
    assert boots[0] == boots[1]
