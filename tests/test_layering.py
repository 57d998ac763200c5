"""The house rule of ARCHITECTURE.md: imports inside nydus_py only go down the declared floors, and no
module takes part in an import circle. Lazy imports inside functions count as imports."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "nydus_py"

# Floors, lowest first. A module may import any package on its own floor or a lower one (peers on one
# floor may not import each other in a circle: the circle test catches that).
FLOORS: list[set[str]] = [
    {"rafs", "fuse", "config"},
    {"storage", "metrics", "transport", "vfs"},
    {"fs", "builder"},
    {"convert", "daemon"},
    {"api"},
    {"snapshotter", "cli", "demo"},
]
FLOOR_OF = {name: i for i, floor in enumerate(FLOORS) for name in floor}
# The package root holds only its version; it sits below everything.
ROOT_MODULES = {"nydus_py"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """Every nydus_py module named by an import anywhere in the file (top level or in a function)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nydus_py":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "nydus_py":
                continue
            yield node.lineno, mod
            for alias in node.names:  # `from nydus_py.x import y` where y is a submodule
                sub = f"{mod}.{alias.name}"
                if (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or (
                    PKG.parent / sub.replace(".", "/") / "__init__.py"
                ).exists():
                    yield node.lineno, sub


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nydus_py"


def floor(pkg: str) -> int:
    if pkg in ROOT_MODULES:
        return -1
    assert pkg in FLOOR_OF, f"package nydus_py.{pkg} has no floor in tests/test_layering.py FLOORS"
    return FLOOR_OF[pkg]


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "grpc_gen" not in p.parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sources()}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for _, target in imports_of(p):
            # resolve to the deepest known module (a name inside a module is not a module)
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != m and not m.startswith(target + "."):
                edges[m].add(target)
    return edges


def test_every_package_has_a_floor() -> None:
    for p in sources():
        floor(package_of(module_name(p)))


def test_imports_only_go_down() -> None:
    bad: list[str] = []
    for p in sources():
        me = module_name(p)
        mine = package_of(me)
        for lineno, target in imports_of(p):
            theirs = package_of(target)
            if theirs == mine or theirs in ROOT_MODULES:
                continue
            if floor(theirs) > floor(mine):
                bad.append(f"{p.relative_to(PKG.parent)}:{lineno}: imports {target} "
                           f"({theirs} is not below {mine})")
    assert not bad, "imports that do not go down:\n" + "\n".join(bad)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles() -> None:
    cycles = find_cycles(graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_circle() -> None:
    # the checker itself must be able to fail
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":  # a report for the closing note: files, circles, upward imports
    g = graph()
    print("files", len(g), "edges", sum(len(v) for v in g.values()))
    for c in find_cycles(g):
        print("circle:", " <-> ".join(c))
    try:
        test_imports_only_go_down()
        print("upward imports: 0")
    except AssertionError as e:
        lines = str(e).splitlines()[1:]
        print("upward imports:", len(lines))
        print("\n".join(lines))
