"""The Dockerfile (no Docker engine here to build it): its base, COPY sources, packages, and that
its entrypoints are console scripts of pyproject.toml that take the arguments given; the build
stage's pip install is replayed on exactly what the COPY lines copy."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from nydus_py.snapshotter import main as snap_main

from .test_deploy import SCRIPTS, doc, flags, script_help, used_flags

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(stage name, its instructions)], global ARGs under the name ''."""
    out: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    for ins, args in instructions():
        if ins == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, args
            out.append((m.group(2) or "", [(ins, args)]))
        else:
            out[-1][1].append((ins, args))
    return out


def arg_defaults() -> dict[str, str]:
    return dict(a.split("=", 1) for ins, a in stages()[0][1] if ins == "ARG" and "=" in a)


def dockerignore() -> list[str]:
    return [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def ignored(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel, pat) or rel.split("/")[0] == pat for pat in dockerignore())


def copy_lines() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    out = []
    for _name, ins in stages():
        for word, args in ins:
            if word == "COPY" and "--from=" not in args:
                *srcs, dest = args.split()
                out.append((srcs, dest))
    return out


def test_base_is_debian_bookworm_slim_with_fuse3():
    defaults = arg_defaults()
    bases = [args.split()[0].replace("${BASE_IMAGE}", defaults["BASE_IMAGE"]) for _n, ins in stages()[1:]
             for word, args in ins if word == "FROM"]
    # fully qualified: buildah and podman refuse an ambiguous short name without a TTY to ask on
    assert bases[0] == "docker.io/library/debian:bookworm-slim"
    runtime = dict(stages())["runtime"]
    assert bases[1] == "docker.io/library/debian:bookworm-slim" and runtime[0][0] == "FROM"
    apt = " ".join(a for w, a in runtime if w == "RUN" and re.search(r"apt-get .*install ", a))
    for pkg in ("python3", "fuse3", "util-linux", "ca-certificates"):
        assert re.search(rf"(?<![\w.-]){re.escape(pkg)}(?![\w.-])", apt), pkg


def test_copy_sources_exist_and_are_not_ignored():
    lines = copy_lines()
    assert lines
    for srcs, _dest in lines:
        for src in srcs:
            assert (REPO / src).exists(), src
            assert not ignored(src), f"{src} is excluded by .dockerignore"
    assert {s for srcs, _ in lines for s in srcs} >= {"pyproject.toml", "README.md", "nydus_py", "requirements.lock",
                                                      "image-build/"}


def test_entrypoints_are_console_scripts_on_path():
    named = dict(stages())
    runtime = named["runtime"]
    linked = set()
    for word, args in runtime:
        if word == "RUN" and "ln -s" in args:
            m = re.search(r"for s in ([\w\s-]+?); do", args)
            assert m and "/usr/local/bin/$s" in args
            linked = set(m.group(1).split())
    assert linked == set(SCRIPTS)  # every console script, nothing else
    entry = {}
    for name in ("nydusd", "snapshotter"):
        words = dict((w, a) for w, a in named[name])
        assert named[name][0] == ("FROM", f"runtime AS {name}")
        entry[name] = (json.loads(words["ENTRYPOINT"]), json.loads(words["CMD"]))
    assert stages()[-1][0] == "snapshotter"  # the default target
    (snap,), snap_cmd = entry["snapshotter"]
    assert snap == "nydus-snapshotter-py" and snap in SCRIPTS
    snap_main.build_parser().parse_args(snap_cmd)
    assert used_flags(snap_cmd) <= flags(script_help(snap))
    (daemon,), daemon_cmd = entry["nydusd"]
    assert daemon == "nydusd-py" and daemon in SCRIPTS and daemon_cmd == ["--help"]
    # where the deploy files expect the daemon: /usr/local/bin, where the Dockerfile links it
    conf = tomllib.loads(doc("ConfigMap")["data"]["config.toml"])
    assert conf["nydusd_path"] == f"/usr/local/bin/{daemon}"
    kata = tomllib.loads((REPO / "deploy" / "kata" / "configuration-qemu.toml").read_text())
    assert kata["hypervisor"]["qemu"]["virtio_fs_daemon"] == f"/usr/local/bin/{daemon}"
    assert doc("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["command"][0] == snap


def test_the_copied_sources_build_a_wheel_with_every_script(tmp_path):
    """The build stage's `pip install /src`, replayed on what the COPY lines put into /src."""
    src = tmp_path / "src"
    for srcs, dest in copy_lines():
        if not dest.startswith("/src"):
            continue
        target = tmp_path / dest.lstrip("/")
        for s in srcs:
            path = REPO / s
            out = target / path.name if dest.endswith("/") else target
            if path.is_dir():
                shutil.copytree(path, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = wheels.glob("nydus_py-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
        module = target.split(":")[0].replace(".", "/") + ".py"
        assert module in names, module
    assert "nydus_py/snapshotter/grpc_gen/snapshots_pb2_grpc.py" in names


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {normalized name: (version, [sha256...])}; every line is accounted for."""
    text = (REPO / "requirements.lock").read_text()
    entry = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.M)
    pins = {canonicalize_name(m.group(1)): (m.group(2), re.findall(r"sha256:([0-9a-f]{64})", m.group(3)))
            for m in entry.finditer(text)}
    rest = entry.sub("", text)
    assert all(ln.startswith("#") for ln in rest.splitlines() if ln.strip()), rest
    return pins


def test_lock_pins_every_runtime_dependency_and_the_build_backend_with_hashes():
    """scripts/lock.sh's output still matches pyproject.toml: rerun it after changing dependencies."""
    pins = lock_pins()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run scripts/lock.sh"
        version, hashes = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"requirements.lock pins {name}=={version}, not {req}"
        assert hashes, name
    assert "x86_64" in (REPO / "requirements.lock").read_text().splitlines()[1]


def test_build_stage_has_no_compiler_and_installs_the_lock_by_hash():
    named = dict(stages())
    runs = {name: [a for w, a in ins if w == "RUN"] for name, ins in named.items()}
    for name, stage_runs in runs.items():
        for a in stage_runs:
            for tool in ("gcc", "python3-dev", "libc6-dev", "build-essential", "g++", "clang"):
                assert not re.search(rf"(?<![\w.-]){re.escape(tool)}(?![\w.-])", a), (name, tool)
    (apt,) = [a for a in runs["build"] if re.search(r"apt-get .*install ", a)]
    packages = re.search(r"--no-install-recommends ([\w.+ -]+?)(?:;|\}|&&)", apt)
    assert packages and packages.group(1).split() == ["python3", "python3-venv"]
    (lock_install,) = [a for a in runs["build"] if "-r /src/requirements.lock" in a]
    assert "--require-hashes" in lock_install and "--only-binary :all:" in lock_install
    assert '--no-index --find-links "/tmp/image-build/$WHEELS"' in lock_install
    assert "PIP_CERT=/etc/nydus-py-build/ca.crt" in lock_install
    (package_install,) = [a for a in runs["build"] if re.search(r"pip install .* /src(\s|$)", a)]
    for flag in ("--no-deps", "--no-index", "--no-build-isolation"):
        assert flag in package_install, flag
    assert ("COPY", "requirements.lock /src/") in named["build"]


def test_every_build_arg_is_documented():
    """The header comment and deploy/README.md name each build arg a user may have to pass."""
    header = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    args = {a.split("=")[0] for _n, ins in stages() for w, a in ins if w == "ARG"} - {"GIT_COMMIT"}
    assert args == {"BASE_IMAGE", "CA_BUNDLE", "WHEELS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"}
    readme = (REPO / "deploy" / "README.md").read_text()
    for arg in args:
        assert re.search(rf"^#\s+{arg}=", "\n".join(header), re.M), arg
        assert f"{arg}=" in readme, arg


def test_kustomization_points_the_daemonset_image():
    """deploy/kubernetes/kustomization.yaml: its resources exist and its images entry names the
    DaemonSet's image, so `kustomize edit set image nydus-py=...` rewrites it."""
    import yaml

    kdir = REPO / "deploy" / "kubernetes"
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    for res in kust["resources"]:
        assert (kdir / res).is_file(), res
    image = doc("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    name, _, tag = image.rpartition(":")
    (entry,) = kust["images"]
    assert (entry["name"], entry["newName"], entry["newTag"]) == (name, name, tag)
