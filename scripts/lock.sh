#!/usr/bin/env bash
# Writes requirements.lock: what the container image installs (Dockerfile: `pip install
# --require-hashes --only-binary :all: -r requirements.lock`), i.e. pyproject.toml's runtime
# dependencies plus setuptools (the image builds nydus_py itself with --no-build-isolation),
# resolved for the image's Python (Debian bookworm's python3: CPython 3.11, glibc 2.36) as binary
# wheels only, each pinned with the sha256 of its wheel for every architecture named.
#
#   scripts/lock.sh                  # x86_64 and aarch64 (what is committed)
#   scripts/lock.sh x86_64           # one architecture only
#   scripts/lock.sh --download image-build/wheels [ARCH]
#       the locked wheels for ARCH (default: this machine's), checked against their hashes, into a
#       directory for an offline image build (`--build-arg WHEELS=wheels`, see the Dockerfile)
#
# Run it after changing [project] dependencies in pyproject.toml (tests/deploy/test_container_image.py
# checks that the lock covers them), or to take newer releases; commit the result.
#
# One index only is asked: PIP_INDEX_URL (default PyPI; PIP_CERT for a TLS-intercepting proxy).
# pip.conf's find-links and extra indexes are ignored so that the hashes are those of the files
# the image build downloads. A dependency with no manylinux wheel for CPython 3.11 fails here
# ("No matching distribution found"), not in the image build: the image has no compiler.
set -euo pipefail

# pip flags selecting binary wheels for the image's Python on architecture $1
target_flags() {
  local v
  flags=(--only-binary :all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none
         --platform any --platform "manylinux2014_$1" --platform "manylinux2010_$1" --platform "manylinux1_$1")
  for v in $(seq 36 -1 5); do flags+=(--platform "manylinux_2_${v}_$1"); done
}

if [ "${1:-}" = --download ]; then
  [ $# -ge 2 ] || { echo "usage: $0 --download DIR [ARCH]" >&2; exit 2; }
  dest=$(realpath -m "$2")
  cd "$(dirname "$0")/.."
  target_flags "${3:-$(uname -m)}"
  python3 -m pip download --quiet --disable-pip-version-check --require-hashes -d "$dest" "${flags[@]}" \
    -r requirements.lock
  echo "$dest: $(ls "$dest"/*.whl | wc -l) wheels"
  exit 0
fi

cd "$(dirname "$0")/.."
out=${LOCK_OUTPUT:-requirements.lock}
if [ $# -gt 0 ]; then arches=("$@"); else arches=(x86_64 aarch64); fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# the runtime dependencies of pyproject.toml, and the build backend it names (>= 70.1: builds
# wheels without the `wheel` package)
mapfile -t reqs < <(python3 - <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print(*project["project"]["dependencies"], "setuptools>=70.1", sep="\n")
EOF
)

for arch in "${arches[@]}"; do
  target_flags "$arch"
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    python3 -m pip download --quiet --disable-pip-version-check -d "$work/$arch" "${flags[@]}" "${reqs[@]}"
done

python3 - "$out" "$work" "${arches[@]}" <<'EOF'
"""One `name==version` per locked distribution with the hash of each architecture's wheel."""
import hashlib
import sys
from pathlib import Path

from packaging.utils import parse_wheel_filename

out, work, arches = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
pins: dict[str, dict[str, object]] = {}
for arch in arches:
    for wheel in sorted((work / arch).glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        pin = pins.setdefault(name, {"version": str(version), "hashes": set(), "arches": set()})
        if pin["version"] != str(version):
            sys.exit(f"lock.sh: {name} resolves to {pin['version']} and {version} on different architectures")
        pin["hashes"].add(hashlib.sha256(wheel.read_bytes()).hexdigest())
        pin["arches"].add(arch)
for name, pin in pins.items():
    if pin["arches"] != set(arches):
        sys.exit(f"lock.sh: {name} is needed on {sorted(pin['arches'])} only; lock the architectures one by one")
lines = [
    "# Written by scripts/lock.sh (do not edit): pyproject.toml's runtime dependencies and setuptools,",
    f"# binary wheels for CPython 3.11 (Debian bookworm) on {', '.join(arches)}, with their sha256.",
    "# The Dockerfile installs this with pip --require-hashes --only-binary :all:.",
]
for name in sorted(pins):
    pin = pins[name]
    lines.append(f"{name}=={pin['version']} \\")
    hashes = sorted(pin["hashes"])
    lines += [f"    --hash=sha256:{h}" + (" \\" if i < len(hashes) - 1 else "") for i, h in enumerate(hashes)]
Path(out).write_text("\n".join(lines) + "\n")
print(f"{out}: {len(pins)} distributions for {', '.join(arches)}")
EOF
