#!/usr/bin/env bash
# Installs everything nydus_py needs on a fresh Debian machine (run as root): the Debian tools the
# tests and benchmarks use as peers/oracles, and the package itself with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  erofs-utils      # fsck.erofs / dump.erofs / mkfs.erofs: the oracle and peer for v6 images
  cryptsetup-bin   # veritysetup: the oracle for `export --verity` hash trees (format and verify)
  squashfs-tools   # mksquashfs: build-speed peer
  squashfuse       # squashfuse_ll: FUSE peer in benchmarks
  fuse3            # fusermount3 for unprivileged mounts
  attr             # getfattr/setfattr for tests and debugging
  acl              # getfacl/setfacl: the POSIX ACL tests compare getfacl -R through a mount with the source
  util-linux       # mount, losetup
  qemu-system-x86  # QEMU 7.2 (TCG) + its virtiofsd: the virtio-fs guest tests and the benchmark peer
  busybox-static   # the guest initramfs of the virtio-fs tests (the kernel is apt-get downloaded by the tests)
  gcc              # builds the static xattr helper for the guest
  libc6-dev        # (static libc for it)
  docker-registry  # distribution 2.8: the real OCI registry the storage tests push to and read from
  apache2-utils    # htpasswd -B: bcrypt users for the basic-auth registry rig
  skopeo           # pushes the OCI-layout test images of the conversion tests to docker-registry
  containerd       # containerd 1.6 + ctr: the snapshotter end-to-end tests run it with its own root and socket
  runc             # the runtime behind `ctr run` in those tests
  stargz-snapshotter  # ctr-remote: `images rpull` sends the remote-snapshotter labels (cri-tools is not in Debian 12)
  buildah          # builds the Dockerfile in tests/deploy/test_container_image.py (vfs storage, chroot isolation: no daemon)
  debootstrap      # makes that test's Debian bookworm base image (minbase) from this machine's apt mirror
)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e ".[test]"
