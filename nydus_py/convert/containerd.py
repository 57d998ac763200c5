"""What `nydusify-py commit` needs to know about a containerd container, through containerd's
own CLI (`ctr`): its image, its snapshot's overlay upper directory, and its task's state (to
pause it while the upper directory is read). The parsing is pure; `Ctr` runs the commands."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from .errors import ConvertError


@dataclass
class Container:
    id: str
    image: str
    snapshotter: str
    snapshot_key: str


def parse_container_info(text: str) -> Container:
    """`ctr containers info ID` (containerd's Container as JSON)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConvertError(f"ctr containers info: not JSON ({e})") from None
    fields = {k: doc.get(k) for k in ("ID", "Image", "Snapshotter", "SnapshotKey")} if isinstance(doc, dict) else {}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing or not fields:
        raise ConvertError(f"ctr containers info: no {', '.join(missing or ['fields'])} in the answer")
    return Container(fields["ID"], fields["Image"], fields["Snapshotter"], fields["SnapshotKey"])  # type: ignore[arg-type]


def upper_dir_of(mount_command: str) -> str:
    """The writable directory of `ctr snapshots mounts` output: `mount -t overlay overlay T -o
    ...,upperdir=U,...` (a container of a Nydus image always has one)."""
    text = mount_command.strip()
    words = shlex.split(text.splitlines()[0]) if text else []
    if len(words) < 2 or words[0] != "mount":
        raise ConvertError(f"unexpected snapshot mount: {text[:200]!r}")
    kind = words[words.index("-t") + 1] if "-t" in words[:-1] else ""
    if kind != "overlay":
        raise ConvertError(f"cannot commit a snapshot mounted as {kind or 'unknown'!r}; only overlay snapshots are "
                           "supported")
    opts = words[words.index("-o") + 1].split(",") if "-o" in words[:-1] else []
    for o in opts:
        if o.startswith("upperdir="):
            return o[len("upperdir="):]
    raise ConvertError("the container's overlay mount has no upperdir (a read-only view cannot be committed)")


def task_status(task_list: str, container_id: str) -> str | None:
    """The STATUS column of `ctr tasks ls` for `container_id` (RUNNING, PAUSED, STOPPED...), or
    None when it has no task."""
    for line in task_list.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3 and cols[0] == container_id:
            return cols[2]
    return None


class Ctr:
    def __init__(self, address: str, namespace: str, binary: str | None = None) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        found = binary or shutil.which("ctr")
        if not found:
            raise ConvertError("`ctr` (containerd's CLI) is not on PATH; commit needs it to inspect the container")
        self.binary = found

    def run(self, *args: str, timeout: float = 60.0) -> str:
        cmd = [self.binary, "--address", self.address, "--namespace", self.namespace, *args]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConvertError(f"ctr {' '.join(args)}: no answer in {timeout:.0f}s") from None
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise ConvertError(f"ctr {' '.join(args[:2])}: {err}")
        return r.stdout

    def resolve(self, container: str) -> str:
        """A full container ID from an ID or a unique prefix of one (as upstream accepts)."""
        ids = self.run("containers", "ls", "-q").split()
        if container in ids:
            return container
        matches = [i for i in ids if i.startswith(container)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ConvertError(f"container {container!r} not found in namespace {self.namespace!r}")
        raise ConvertError(f"container {container!r} is ambiguous: {', '.join(sorted(matches)[:5])}")

    def container(self, container_id: str) -> Container:
        return parse_container_info(self.run("containers", "info", container_id))

    def upper_dir(self, c: Container) -> str:
        return upper_dir_of(self.run("snapshots", "--snapshotter", c.snapshotter, "mounts", "/", c.snapshot_key))

    def status(self, container_id: str) -> str | None:
        return task_status(self.run("tasks", "ls"), container_id)

    def pause(self, container_id: str) -> None:
        self.run("tasks", "pause", container_id)

    def resume(self, container_id: str) -> None:
        self.run("tasks", "resume", container_id)
