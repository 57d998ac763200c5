"""What the daemon asks of the transport that carries its FUSE session: `/dev/fuse`
(`fusedev.FuseDevSession`) or a vhost-user-fs socket (`vhost_user.VhostUserServer`)."""

from typing import Protocol


class Transport(Protocol):
    def wait(self, timeout: float | None = None) -> bool:
        """Block up to `timeout`; True once serving has ended (unmounted, front-end gone, stopped)."""

    def stop(self) -> None:
        """Stop serving and release what the transport holds (a FUSE mount is detached lazily)."""
