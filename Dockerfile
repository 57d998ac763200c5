# nydus_py in a container: nydus-snapshotter-py (default) and nydusd-py.
#
#   docker build -t nydus-py .                       # entrypoint: nydus-snapshotter-py
#   docker build --target nydusd -t nydusd-py .      # entrypoint: nydusd-py
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) ...   # what `nydusd-py --version` reports
#
# Both images hold every console script (nydus-snapshotter-py, nydusd-py, nydusify-py,
# nydus-image-py) in /usr/local/bin; deploy/kubernetes/ runs the default one privileged with
# /dev/fuse (see deploy/README.md).

ARG DEBIAN=bookworm-slim

# -- build: a virtual environment with the package and its wheels --------------------------------
FROM debian:${DEBIAN} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/nydus-py
COPY pyproject.toml README.md /src/
COPY nydus_py /src/nydus_py
RUN /opt/nydus-py/bin/pip install --no-cache-dir --disable-pip-version-check /src

# -- runtime -------------------------------------------------------------------------------------
FROM debian:${DEBIAN} AS runtime
# fuse3: fusermount3 and /etc/fuse.conf; util-linux: mount/umount; ca-certificates: HTTPS registries
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 fuse3 util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/nydus-py /opt/nydus-py
RUN for s in nydus-snapshotter-py nydusd-py nydusify-py nydus-image-py; do \
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
