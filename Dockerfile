# nydus_py in a container: nydus-snapshotter-py (default) and nydusd-py.
#
#   buildah bud -t nydus-py .    (or docker build -t nydus-py .)    # entrypoint: nydus-snapshotter-py
#   buildah bud --target nydusd -t nydusd-py .                       # entrypoint: nydusd-py
#   ... --build-arg GIT_COMMIT=$(git rev-parse HEAD)                 # what `nydusd-py --version` reports
#
# Both images hold every console script (nydus-snapshotter-py, nydusd-py, nydusify-py,
# nydus-image-py, nydus-overlayfs-py) in /usr/local/bin; deploy/kubernetes/ runs the default one privileged with
# /dev/fuse (deploy/README.md: building, pushing, and pointing the DaemonSet at the image).
#
# Python dependencies come from requirements.lock (written by scripts/lock.sh), checked against its
# sha256 hashes, binary wheels only: no compiler, no python3-dev. The build needs a package index
# and a Debian mirror, or, where those are not reachable as they are, these build args:
#
#   PIP_INDEX_URL=URL          the index pip asks (default PyPI): a PyPI mirror (devpi, Nexus, Artifactory)
#   PIP_EXTRA_INDEX_URL=URL    more indexes, space-separated
#   CA_BUNDLE=FILE             a PEM file in image-build/ of the build context: the CA of a
#                              TLS-intercepting proxy or of a private index. pip (PIP_CERT) and apt
#                              (Acquire::https::CAInfo) verify with it instead of their default roots
#                              (append those if some hosts are reached directly); the image trusts
#                              it at run time too (registries behind the same proxy).
#   WHEELS=DIR                 a directory in image-build/ with the wheels of requirements.lock
#                              (`scripts/lock.sh --download image-build/wheels`): pip installs
#                              offline (--no-index --find-links); apt still needs a Debian mirror.
#   HTTP_PROXY, HTTPS_PROXY, NO_PROXY   predefined build args: an explicit proxy for pip and apt
#   BASE_IMAGE=REF             the Debian bookworm (python3 3.11) image both stages start from
#
# Without them, behind a TLS-intercepting proxy pip fails with "CERTIFICATE_VERIFY_FAILED"; each
# install step below then ends with a line naming the build arg that is missing.

ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

# -- build: a virtual environment with the package and its locked wheels -------------------------
FROM ${BASE_IMAGE} AS build
ARG CA_BUNDLE=""
ARG WHEELS=""
ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
COPY image-build/ /tmp/image-build/
# the build args checked once: the CA bundle lands at /etc/nydus-py-build/ca.crt (empty: none)
RUN set -eu; mkdir -p /etc/nydus-py-build; : > /etc/nydus-py-build/ca.crt; \
    if [ -n "$CA_BUNDLE" ]; then \
        f="/tmp/image-build/$CA_BUNDLE"; \
        [ -f "$f" ] || { echo "CA_BUNDLE=$CA_BUNDLE: no such file in image-build/ of the build context; copy the PEM bundle there" >&2; exit 1; }; \
        grep -q -e '-----BEGIN CERTIFICATE-----' "$f" || { echo "CA_BUNDLE=$CA_BUNDLE: not a PEM certificate bundle (no BEGIN CERTIFICATE line)" >&2; exit 1; }; \
        cp "$f" /etc/nydus-py-build/ca.crt; \
    fi; \
    if [ -n "$WHEELS" ] && ! ls "/tmp/image-build/$WHEELS/"*.whl >/dev/null 2>&1; then \
        echo "WHEELS=$WHEELS: no *.whl in image-build/$WHEELS of the build context; fill it with scripts/lock.sh --download image-build/$WHEELS" >&2; exit 1; \
    fi
RUN set -eu; ca=/etc/nydus-py-build/ca.crt; opt=""; [ ! -s "$ca" ] || opt="-o Acquire::https::CAInfo=$ca"; \
    { apt-get $opt update && apt-get $opt install -y --no-install-recommends python3 python3-venv; } \
    || { echo "apt-get failed: the base image's Debian mirror must be reachable (build args HTTP_PROXY/HTTPS_PROXY for a proxy, CA_BUNDLE for a TLS-intercepting one)" >&2; exit 1; }; \
    apt-get clean; rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nydus-py
COPY requirements.lock /src/
# PIP_INDEX_URL and PIP_EXTRA_INDEX_URL reach pip as environment variables (empty ones are ignored)
RUN set -eu; [ ! -s /etc/nydus-py-build/ca.crt ] || export PIP_CERT=/etc/nydus-py-build/ca.crt; \
    if [ -n "$WHEELS" ]; then set -- --no-index --find-links "/tmp/image-build/$WHEELS"; else set --; fi; \
    /opt/nydus-py/bin/pip install --no-cache-dir --disable-pip-version-check --require-hashes --only-binary :all: \
        "$@" -r /src/requirements.lock \
    || { echo "pip could not install requirements.lock: behind a TLS-intercepting proxy pass --build-arg CA_BUNDLE=<PEM file in image-build/>, for a mirror --build-arg PIP_INDEX_URL=<url>, offline --build-arg WHEELS=<dir in image-build/> (scripts/lock.sh --download); a hash mismatch means the index serves other files than the lock names (scripts/lock.sh)" >&2; exit 1; }
COPY pyproject.toml README.md /src/
COPY nydus_py /src/nydus_py
# the package itself: its dependencies are all in the lock, setuptools (locked) builds it; then
# pip and setuptools leave the environment (23 MB that nothing runs)
RUN /opt/nydus-py/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --no-deps \
        --no-build-isolation /src \
    && /opt/nydus-py/bin/python3 -m pip uninstall -y -q --disable-pip-version-check setuptools pip

# -- runtime -------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
COPY --from=build /etc/nydus-py-build/ca.crt /usr/local/share/ca-certificates/nydus-py-build-ca.crt
# fuse3: fusermount3 and /etc/fuse.conf; util-linux: mount/umount; ca-certificates: HTTPS registries
# (its postinst adds the CA_BUNDLE, if any, to /etc/ssl/certs/ca-certificates.crt)
RUN set -eu; ca=/usr/local/share/ca-certificates/nydus-py-build-ca.crt; opt=""; \
    if [ -s "$ca" ]; then opt="-o Acquire::https::CAInfo=$ca"; else rm "$ca"; fi; \
    { apt-get $opt update && apt-get $opt install -y --no-install-recommends python3 fuse3 util-linux ca-certificates; } \
    || { echo "apt-get failed: the base image's Debian mirror must be reachable (build args HTTP_PROXY/HTTPS_PROXY for a proxy, CA_BUNDLE for a TLS-intercepting one)" >&2; exit 1; }; \
    apt-get clean; rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/nydus-py /opt/nydus-py
RUN for s in nydus-snapshotter-py nydusd-py nydusify-py nydus-image-py nydus-overlayfs-py; do \
        ln -s /opt/nydus-py/bin/$s /usr/local/bin/$s; done
ARG GIT_COMMIT=""
ENV NYDUS_PY_GIT_COMMIT=${GIT_COMMIT}
VOLUME ["/var/lib/containerd-nydus-py"]

FROM runtime AS nydusd
ENTRYPOINT ["nydusd-py"]
CMD ["--help"]

FROM runtime AS snapshotter
ENTRYPOINT ["nydus-snapshotter-py"]
CMD ["--root", "/var/lib/containerd-nydus-py", "--address", "/run/containerd-nydus-py/containerd-nydus-grpc.sock"]
