"""`nydusify-py` loads at start only what `convert` needs: the other commands' own modules
(containerd for commit, the chunk-dictionary generator, the FUSE mount helpers, the optimizer) are imported by
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
    "nydus_py.convert.optimizer": "optimize",
    "nydus_py.builder.optimize": "optimize",
}


def test_the_nydusify_entry_point_loads_no_other_commands_modules() -> None:
    code = ("import sys, json; import nydus_py.cli.nydusify as n; n._parser(); "
            f"print(json.dumps([m for m in {sorted(LAZY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    assert loaded == [], {m: LAZY[m] for m in loaded}


def test_optimize_names_the_optimizers_policy() -> None:
    from nydus_py.cli import nydusify_optimize
    from nydus_py.convert import optimizer

    assert nydusify_optimize.POLICY == optimizer.POLICY


def test_what_the_imports_made_is_left_out_of_full_collections() -> None:
    """`main` freezes the objects the imports made (`gc.freeze`): a full collection during a
    conversion walks only what the conversion made (one walked the modules too: ~15 ms in a
    --build-cache rebuild of 0.7 s). Run as a command, so this process's own heap is not frozen."""
    code = ("import gc, sys; import nydus_py.cli.nydusify as n\n"
            "try:\n    n.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(gc.get_freeze_count(), len(gc.get_objects()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    frozen, tracked = map(int, out.stdout.split()[-2:])
    assert frozen > 10_000 and tracked < frozen // 10, (frozen, tracked)


def test_the_imports_run_no_collection_and_leave_the_collector_on() -> None:
    """The ~200k objects the imports make set off ~70 collections (~8 ms of every start) for no
    garbage: the collector is off while they run, what they made is frozen, and it is on again
    after (also when an import fails: try/finally)."""
    code = ("import gc, sys\nruns = []\ngc.callbacks.append(lambda phase, info: runs.append(phase))\n"
            "import nydus_py.cli.nydusify\n"
            "print(len(runs), gc.isenabled(), gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    runs, enabled, frozen = out.stdout.split()
    assert (runs, enabled) == ("0", "True") and int(frozen) > 10_000, out.stdout
