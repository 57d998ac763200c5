"""Coverage-guided fuzzing of the RAFS bootstrap parser (v5 and v6) with atheris/libFuzzer.

Each input is a bootstrap. It must open and walk completely (every inode, dirent, xattr, symlink,
chunk record, and chunk data where the blob is known) or raise nydus_py's FormatError; any other
exception, a timeout (-timeout) or an RSS blow-up (-rss_limit_mb) is a crash, saved by libFuzzer
as crash-*/timeout-*/oom-* in -artifact_prefix. The corpus starts from the real Nydus fixtures
and v5/v6 images built by our builder. See fuzz/README.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris
from common import FIXTURES, Tally, corpus_dir, read_blobs

with atheris.instrument_imports(include=["nydus_py.rafs"]):
    # v5/v6 are imported lazily by the loader: import them here so they are instrumented too
    import nydus_py.rafs.blobmeta
    import nydus_py.rafs.chunkdata
    import nydus_py.rafs.v5
    import nydus_py.rafs.v6  # noqa: F401
    from nydus_py.rafs.errors import FormatError
    from nydus_py.rafs.loader import open_bytes

from tests.rafs.walk import exercise  # noqa: E402  (after the instrumented imports)
from tests.reliability.sweep import prepare  # noqa: E402

TALLY = Tally("bootstrap")
BLOBS: dict[str, bytes] = {}


def seed(corpus: Path) -> Path:
    """Fill an empty corpus with the fixtures and freshly built images; returns the blob dir."""
    blobs = corpus.with_name(corpus.name + ".blobs")
    if corpus.is_dir() and any(corpus.iterdir()):
        return blobs
    corpus.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        import json
        import shutil

        config = json.loads(prepare(Path(tmp), FIXTURES).read_text())
        for b in config["bases"]:
            shutil.copy(b["boot"], corpus / Path(b["boot"]).name)
        shutil.copytree(Path(tmp) / "blobs", blobs, dirs_exist_ok=True)
    return blobs


def one_input(data: bytes) -> None:
    try:
        img = open_bytes(data)
    except FormatError:
        TALLY.add("FormatError at open")
        return
    try:
        exercise(img, BLOBS)
        TALLY.add("ok")
    except FormatError:
        TALLY.add("FormatError in walk")
    finally:
        img.close()


def main() -> None:
    argv = list(sys.argv)
    blob_dir = seed(corpus_dir(argv, "/tmp/nydus-fuzz/bootstrap"))
    BLOBS.update(read_blobs(FIXTURES / "blobs", blob_dir))
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
