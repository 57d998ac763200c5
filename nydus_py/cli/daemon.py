"""`nydusd-py`'s entry point and the backend factory every daemon mode shares (`make_source`).

The daemon itself (CLI, state machine, VFS, APIs) lives in `nydus_py.daemon`."""

import logging
import sys

from ..daemon.config import ConfigError, RafsConfig
from ..rafs.chunkdata import BlobSource
from ..storage.localfs import LocalBlobDir, SingleBlobFile

log = logging.getLogger("nydusd-py")


def make_source(cfg: RafsConfig) -> BlobSource:
    if cfg.backend.type == "localfs":
        conf = cfg.backend.config
        if conf.get("blob_file"):
            return SingleBlobFile(str(conf["blob_file"]))
        return LocalBlobDir(str(conf["dir"]), alt_dirs=[str(d) for d in conf.get("alt_dirs") or []])
    raise ConfigError(f"backend {cfg.backend.type!r} is not available in this build")


def main(argv: list[str] | None = None) -> int:
    """`nydusd-py` (fuse | virtiofs | singleton, nydusd's flags): see nydus_py.daemon.main."""
    from ..daemon.main import main as daemon_main

    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
