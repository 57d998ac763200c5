"""OCI image -> Nydus image conversion (`nydusify-py`) and Nydus image references.

Sans-IO pieces: `reference` (image names), `oci` (manifests, indexes, platforms and the Nydus
conventions of NYDUSD-CONTRACT.md 7), `layer` (streaming decompression, the bootstrap layer tar).
With I/O: `stack` (one RAFS blob per layer + the merged bootstrap), `converter` (pull, build, push),
`pull` (the bootstrap of a Nydus image in a registry, for mounting by reference).
"""
