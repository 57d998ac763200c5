"""`nydusify-py` loads at start only what `convert` needs: the other commands' own modules
(containerd for commit, the chunk-dictionary generator, the FUSE mount helpers) are imported by
those commands (issue 14: a cached rebuild pays the start-up in full)."""

import json
import subprocess
import sys

# module -> the command that needs it
LAZY = {
    "nydus_py.convert.containerd": "commit",
    "nydus_py.convert.committer": "commit",
    "nydus_py.convert.chunkdict": "chunkdict generate",
    "nydus_py.transport.mount": "mount",
}


def test_the_nydusify_entry_point_loads_no_other_commands_modules() -> None:
    code = ("import sys, json; import nydus_py.cli.nydusify as n; n._parser(); "
            f"print(json.dumps([m for m in {sorted(LAZY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    assert loaded == [], {m: LAZY[m] for m in loaded}
