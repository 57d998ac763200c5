"""A FUSE session over a RAFS image built from a source tree, with warming on, driven request by
request as the kernel sends them (no kernel): the rig of the warm-up tests."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nydus_py.fs.rafs_fs import RafsFilesystem
from nydus_py.fuse.protocol import FuseSession
from nydus_py.rafs import open_bootstrap
from nydus_py.storage.device import BlobDevice
from nydus_py.storage.localfs import LocalBlobDir
from nydus_py.vfs.vfs import Vfs
from tests.fs.mountrig import build
from tests.fuse.kernel import Kernel


@contextmanager
def warm_session(src: Path, work: Path) -> Iterator[tuple[Kernel, FuseSession, RafsFilesystem]]:
    """(kernel, session, filesystem) of `src` built into `work`, INIT done, warm size 128 KiB."""
    img = build(str(src), str(work), views=False)
    image = open_bootstrap(img.boot)
    source = LocalBlobDir(img.blob_dir)
    fs = RafsFilesystem(image, BlobDevice(image, source), readahead_chunks=0)
    vfs = Vfs()
    vfs.mount("/", fs)
    session = FuseSession(vfs)
    session.warm_max = 128 << 10
    k = Kernel(session)
    k.init()
    try:
        yield k, session, fs
    finally:
        fs.close()
        source.close()
        image.close()
