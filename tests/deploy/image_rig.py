"""What the container image tests build with: buildah on a storage of their own (vfs driver, chroot
isolation: works as root inside a container or VM without overlayfs or user namespaces), a Debian
bookworm base image made with debootstrap from the mirror this host's apt uses (its tarball cached
outside the repo), a build context holding just what the Dockerfile copies, and a PEP 503 package
index over HTTPS with a certificate of our own CA (what a TLS-intercepting proxy looks like to pip).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
# the debootstrap tarball and the locked wheels, kept between runs (outside the repo, as the VM
# kernel of tests/transport/virtio_rig.py)
CACHE_DIR = Path(os.environ.get("NYDUS_PY_IMAGE_CACHE", "/var/cache/nydus_py/image"))
LOCAL_BASE = "localhost/nydus-py-test/debian:bookworm-minbase"
# dpkg filters of the official debian:*-slim images: no docs, man pages or translations
SLIM_DPKG = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""


class RigError(RuntimeError):
    pass


def run(argv: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`argv`, its output captured; a non-zero exit raises with the output's tail."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode != 0:
        raise RigError(f"{argv[:4]}... exited {r.returncode}:\n{(r.stdout + r.stderr)[-4000:]}")
    return r


# -- the Debian mirror of this host ----------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def _one_line_sources(text: str) -> list[AptSource]:
    out = []
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb":
            out.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return out


def _deb822_sources(text: str) -> list[AptSource]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            out.append(AptSource(uri, tuple(fields.get("suites", "").split()),
                                 tuple(fields.get("components", "").split())))
    return out


def bookworm_sources(etc_apt: Path = Path("/etc/apt")) -> list[AptSource]:
    """This host's apt sources of Debian bookworm (main suite, -updates, -security), in its order."""
    found: list[AptSource] = []
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for f in files:
        if f.suffix == ".sources":
            found += _deb822_sources(f.read_text())
        elif f.name == "sources.list" or f.suffix == ".list":
            found += _one_line_sources(f.read_text()) if f.exists() else []
    out = []
    for src in found:
        suites = tuple(s for s in src.suites if s == "bookworm" or s.startswith("bookworm-"))
        if suites:
            out.append(AptSource(src.uri.rstrip("/"), suites, src.components))
    return out


def main_mirror(sources: list[AptSource]) -> str:
    override = os.environ.get("NYDUS_PY_DEBIAN_MIRROR")
    if override:
        return override
    for src in sources:
        if "bookworm" in src.suites:
            return src.uri
    raise RigError("no Debian bookworm source in /etc/apt/sources.list*: set NYDUS_PY_DEBIAN_MIRROR, "
                   "or NYDUS_PY_TEST_BASE_IMAGE to a bookworm image buildah can pull")


# -- the base image ----------------------------------------------------------------------------------


def base_tarball(sources: list[AptSource], scratch: Path) -> Path:
    """A debootstrap --variant=minbase bookworm root file system, slimmed as debian:bookworm-slim is
    and with this host's bookworm sources, as a tar under CACHE_DIR (made once, ~30 s, in
    `scratch`: dpkg syncs every file it unpacks, which a tmpfs makes free)."""
    mirror = main_mirror(sources)
    lines = "".join(f"deb {s.uri} {' '.join(s.suites)} {' '.join(s.components)}\n" for s in sources)
    if not lines:
        lines = f"deb {mirror} bookworm main\n"
    key = hashlib.sha256((mirror + lines + SLIM_DPKG).encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"debian-bookworm-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = scratch / f"rootfs-{key}"
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    log.info("debootstrap --variant=minbase bookworm from %s into %s", mirror, root)
    run([debootstrap, "--variant=minbase", "bookworm", str(root), mirror], timeout=900)
    (root / "etc/apt/sources.list").write_text(lines)
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG)
    for sub in ("usr/share/groff", "usr/share/info", "usr/share/linda", "usr/share/lintian/overrides",
                "usr/share/locale", "usr/share/man", "var/lib/apt/lists"):
        for p in (root / sub).glob("*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (root / "usr/share/doc").glob("*/*"):
        if p.name != "copyright":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in [*(root / "var/cache/apt/archives").glob("*.deb"), *(root / "var/cache/apt").glob("*.bin")]:
        p.unlink()
    part = tarball.with_suffix(".part")
    run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(part), "."], timeout=300)
    part.rename(tarball)
    shutil.rmtree(root)
    return tarball


# -- buildah -----------------------------------------------------------------------------------------


@dataclass
class Buildah:
    """buildah with a storage of its own under `state`; `from_local` when the base was made here."""

    binary: str
    state: Path
    base: str = ""
    from_local: bool = False

    @property
    def cmd(self) -> list[str]:
        return [self.binary, "--root", str(self.state / "root"), "--runroot", str(self.state / "run"),
                "--storage-driver", "vfs"]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run([*self.cmd, *args], timeout=timeout)

    def import_tarball(self, tarball: Path, name: str) -> None:
        ctr = self("from", "--quiet", "scratch").stdout.strip()
        self("add", "--quiet", ctr, str(tarball), "/")
        self("config", "--cmd", "/bin/bash", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             ctr)
        self("commit", "--quiet", "--rm", ctr, name)

    def bud(self, context: Path, tag: str, build_args: dict[str, str], *extra: str,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`buildah bud` of the context's Dockerfile; returns the result whatever the exit status."""
        argv = [*self.cmd, "bud", "--isolation", "chroot", "--network", "host",
                "--pull=never" if self.from_local else "--pull=false", "-t", tag,
                "--build-arg", f"BASE_IMAGE={self.base}", *extra]
        for k, v in build_args.items():
            argv += ["--build-arg", f"{k}={v}"]
        return subprocess.run([*argv, str(context)], capture_output=True, text=True, timeout=timeout)

    def run_in(self, image: str, *argv: str) -> str:
        """argv in a working container of `image`; its stdout."""
        ctr = self("from", "--quiet", "--pull=never", image).stdout.strip()
        try:
            return self("run", "--isolation", "chroot", ctr, "--", *argv, timeout=120).stdout
        finally:
            self("rm", ctr)

    def forget(self, *images: str) -> None:
        """Remove working containers, `images` and the layers only they used (the base stays)."""
        self("rm", "--all")
        for image in images:
            self("rmi", "--force", image)
        self("rmi", "--prune")

    def image_size(self, image: str) -> str:
        """Size of `image` in the storage (uncompressed layers), as buildah says it ("198 MB")."""
        (entry,) = json.loads(self("images", "--json", image).stdout)
        return str(entry["size"])


def storage_tmpfs(path: Path, size: str = "6g") -> bool:
    """Mount a tmpfs at `path` for the vfs storage (every vfs layer is a full copy of the root file
    system: on a busy disk that copying, and deleting it afterwards, is most of the build time).
    False, logged, when it cannot be mounted: the storage then lives on disk."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "nydus-py-buildah", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        log.warning("buildah storage on disk, no tmpfs at %s: %s", path, r.stderr.strip())
        return False
    return True


def build_context(dest: Path) -> Path:
    """The files the Dockerfile COPYs (its sources from the build context), nothing else."""
    from tests.deploy.test_dockerfile import copy_lines

    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Dockerfile", dest / "Dockerfile")
    for srcs, _dst in copy_lines():
        for src in srcs:
            path = REPO / src.rstrip("/")
            if path.is_dir():
                shutil.copytree(path, dest / path.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, dest / path.name)
    return dest


def locked_wheels(arch: str) -> Path:
    """The wheels of requirements.lock for `arch` (scripts/lock.sh --download), cached per lock."""
    lock = (REPO / "requirements.lock").read_bytes()
    dest = CACHE_DIR / f"wheels-{arch}-{hashlib.sha256(lock).hexdigest()[:12]}"
    if not (dest / ".complete").exists():
        run([str(REPO / "scripts" / "lock.sh"), "--download", str(dest), arch], timeout=600)
        (dest / ".complete").write_text("")
    return dest


# -- a package index over HTTPS ----------------------------------------------------------------------


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, served: list[str], **kw: Any) -> None:
        self._served = served
        super().__init__(*args, **kw)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        self._served.append(self.path)


@dataclass
class HttpsIndex:
    """A PEP 503 simple index of the wheels in `wheels`, served at https://127.0.0.1:<port>/simple/
    with `cert`/`key`; `served` lists the path of each request."""

    wheels: Path
    root: Path
    cert: Path
    key: Path
    served: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> HttpsIndex:
        files = self.root / "files"
        files.mkdir(parents=True)
        by_name: dict[str, list[Path]] = {}
        for whl in sorted(self.wheels.glob("*.whl")):
            (files / whl.name).symlink_to(whl)
            by_name.setdefault(normalize(whl.name.split("-")[0]), []).append(whl)
        for name, whls in by_name.items():
            page = self.root / "simple" / name / "index.html"
            page.parent.mkdir(parents=True)
            links = "".join(f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                            f"{w.name}</a><br>\n" for w in whls)
            page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
        handler = functools.partial(_Handler, served=self.served, directory=str(self.root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"https://127.0.0.1:{self._server.server_address[1]}/simple"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
