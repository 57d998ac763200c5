"""deploy/windows-guest.md: its command lines, config and libvirt XML are what our daemon, config
parser and libvirt's schema-relevant parts expect (shared memfd memory, queue 1024)."""

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from nydus_py.cli.daemon_options import parse_args
from nydus_py.config import parse_any

DOC = Path(__file__).resolve().parents[2] / "deploy" / "windows-guest.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def commands(prefix: str) -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip().startswith(prefix):
                out.append(shlex.split(cmd))
    return out


def test_daemon_command_lines_parse() -> None:
    cmds = commands("nydusd-py")
    assert len(cmds) == 3
    for argv in cmds:
        args = parse_args(argv[1:])
        assert args.command == "virtiofs" and args.sock == "/run/nydusd-py/win.sock"
    assert sum(parse_args(a[1:]).case_insensitive for a in cmds) == 2


def test_config_turns_case_insensitive_on() -> None:
    (config,) = blocks("json")
    assert parse_any(json.dumps(json.loads(config))).rafs.case_insensitive


def test_qemu_line_shares_memory_and_asks_for_1024() -> None:
    (qemu,) = commands("qemu-system-x86_64")
    joined = " ".join(qemu)
    assert "memory-backend-memfd,id=mem,size=8G,share=on" in joined and "node,memdev=mem" in joined
    (dev,) = [qemu[i + 1] for i, a in enumerate(qemu) if a == "-device" and qemu[i + 1].startswith("vhost-user-fs")]
    opts = dict(kv.split("=", 1) for kv in dev.split(",")[1:])
    assert opts["queue-size"] == "1024" and opts["tag"] == "nydus"
    (chardev,) = [qemu[i + 1] for i, a in enumerate(qemu) if a == "-chardev"]
    assert f"id={opts['chardev']}" in chardev and "path=/run/nydusd-py/win.sock" in chardev


def test_libvirt_xml() -> None:
    (xml,) = blocks("xml")
    dom = ET.fromstring(xml)

    def attrs(path: str) -> dict[str, str]:
        el = dom.find(path)
        assert el is not None, path
        return dict(el.attrib)

    assert attrs("memoryBacking/source") == {"type": "memfd"}
    assert attrs("memoryBacking/access") == {"mode": "shared"}
    assert attrs("devices/filesystem/driver") == {"type": "virtiofs", "queue": "1024"}
    assert attrs("devices/filesystem/source") == {"socket": "/run/nydusd-py/win.sock"}
    assert attrs("devices/filesystem/target") == {"dir": "nydus"}
