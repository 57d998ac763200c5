"""A containerd proxy snapshotter (`nydus-snapshotter-py`): overlayfs snapshots like containerd's
built-in one, and Nydus images mounted lazily by reference through one shared `nydusd-py`.

Modules: `store` (sqlite metadata), `filters` (containerd's filter syntax), `labels` (remote
layer labels), `snapshotter` (the core), `nydusd` (the shared daemon), `service` (gRPC),
`main` (command line), `extraoption` (the Kata `extraoption=` codec), `overlayfs_helper`
(`nydus-overlayfs-py`, the mount helper that drops it for runc); `grpc_gen` holds the stubs
generated from proto/containerd.
"""
