"""What `nydusd-py --version` prints and `GET /api/v1/daemon` reports, from one source.

The snapshotter compares the `Git Commit:` line of `--version` with the API's
`version.git_commit` of each running daemon and hot-upgrades on any difference, so both come from
`build_info()`. The commit is read from the checkout's .git (no subprocess), or from
NYDUS_PY_GIT_COMMIT, or else is a digest of the package's sources (stable for one install).
"""

import functools
import os
import platform
import sys
import time
from pathlib import Path

from .. import __version__

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _read_git_head(repo: Path) -> str | None:
    git = repo / ".git"
    if git.is_file():  # a worktree: "gitdir: <path>"
        text = git.read_text().strip()
        if not text.startswith("gitdir:"):
            return None
        git = (repo / text[7:].strip()).resolve()
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head if len(head) == 40 else None
    ref = head[4:].strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in (git, common):
        try:
            value = (base / ref).read_text().strip()
            if len(value) == 40:
                return value
        except OSError:
            pass
        try:
            for line in (base / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref) and len(line.split()[0]) == 40:
                    return line.split()[0]
        except OSError:
            pass
    return None


def _source_digest() -> str:
    import hashlib  # (lazily: libcrypto is ~3.5 MiB of RSS)

    h = hashlib.sha1()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE_DIR)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def build_info() -> dict[str, str]:
    commit = os.environ.get("NYDUS_PY_GIT_COMMIT") or _read_git_head(PACKAGE_DIR.parent) or _source_digest()
    built = os.path.getmtime(Path(__file__))
    return {
        "package_ver": f"v{__version__}",
        "git_commit": commit,
        "build_time": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime(built)),
        "profile": "release",
        "rustc": f"{platform.python_implementation()} {platform.python_version()}",
    }


def version_text() -> str:
    """nydusd's `--version` layout: "nydusd ", a carriage return, then tab-separated lines."""
    b = build_info()
    return (f"nydusd \rVersion:\t{b['package_ver']}\nGit Commit:\t{b['git_commit']}\n"
            f"Build Time:\t{b['build_time']}\nProfile:\t{b['profile']}\nRustc:\t\t{b['rustc']}\n")


def print_version() -> None:
    sys.stdout.write(version_text())
    sys.stdout.flush()
