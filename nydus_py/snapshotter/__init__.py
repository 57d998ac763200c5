"""A containerd proxy snapshotter (`nydus-snapshotter-py`): overlayfs snapshots like containerd's
built-in one, and Nydus images mounted lazily by reference through one shared `nydusd-py`.

Modules: `store` (sqlite metadata), `filters` (containerd's filter syntax), `labels` (remote
layer labels), `snapshotter` (the core), `nydusd` (the shared daemon), `service` (gRPC),
`main` (command line); `grpc_gen` holds the stubs generated from proto/containerd.
"""
