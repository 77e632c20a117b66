"""The layer order of docs/design.md §2, kept: every import between fastwidth's modules points down.

The rooms, bottom to top (a module may import from its own room or any room below):

    errors/config → run → kernels → nn → param/models → data → stats → parallel → trainer → report
    → interop → api → cli

Imports are read with ast, every one of them: module level, inside functions (lazy), under `if`,
`from . import x`, relative imports resolved. Importing `fastwidth.a.b` runs the package inits on
the way, but those are not counted as arrows: an __init__ that only imports downwards costs
nothing, and one that does more is checked as a module of its own.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastwidth"

# bottom to top; one entry per room: the module-name prefixes (below fastwidth.) it holds
ROOMS: list[tuple[str, tuple[str, ...]]] = [
    ("errors/config", ("errors", "config", "config_schema", "config_args")),
    ("run", ("run",)),
    ("kernels", ("kernels",)),
    ("nn", ("nn",)),
    ("param/models", ("param", "models")),
    ("data", ("data",)),
    ("stats", ("stats",)),
    ("parallel", ("parallel",)),
    ("trainer", ("trainer",)),
    ("report", ("report",)),
    ("interop", ("interop",)),
    ("api", ("api", "")),  # "": the package's own __init__, whose PEP 562 hook serves api's names
    ("cli", ("cli", "__main__")),
]

# Arrows up that stay on purpose, each with its reason (docs/design.md §2 lists them too).
ALLOWED_UP: dict[tuple[str, str], str] = {}  # none: every arrow points down


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name → file, for every .py below `package` (a package's name for its __init__)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative `from ...name import` seen in `module`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, modules: set[str], root: str) -> set[str]:
    """The project modules that `module` imports anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()

    def add(target: str):  # the deepest project module the dotted name names
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != module:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == root or alias.name.startswith(root + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module) if node.level else (node.module or "")
            if not (base == root or base.startswith(root + ".")):
                continue
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    files = module_files(package)
    names = set(files)
    return {m: imports_of(m, f, names, package.name) for m, f in files.items()}


def room_of(module: str, root: str = "fastwidth") -> int:
    rest = module[len(root) + 1:] if module != root else ""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(ROOMS):
        for p in prefixes:
            if (rest == p or rest.startswith(p + ".") or (p == "" and rest == "")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{module} is in no room of tests/test_layers.py's ROOMS: add it there and to "
                             f"docs/design.md's layer picture")
    return best


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
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


def arrows_up(graph: dict[str, set[str]], root: str = "fastwidth") -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets
                  if room_of(b, root) > room_of(a, root) and (a, b) not in ALLOWED_UP)


def describe(graph: dict[str, set[str]], root: str = "fastwidth") -> str:
    lines = [f"  circle: {' <-> '.join(c)}" for c in circles(graph)]
    lines += [f"  up: {a} ({ROOMS[room_of(a, root)][0]}) imports {b} ({ROOMS[room_of(b, root)][0]})"
              for a, b in arrows_up(graph, root)]
    return "\n".join(lines)


def test_every_import_points_down_and_no_module_circles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50, "the package was not found"
    for m in graph:
        room_of(m)  # every module sits in a room
    problems = describe(graph)
    assert not problems, ("imports against the layer order of docs/design.md §2 (move the shared helper down to "
                          "where both users reach it):\n" + problems)


def _plant(tmp_path: Path) -> Path:
    copy = tmp_path / "fastwidth"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "configs"))
    return copy


def test_checker_catches_a_planted_arrow_up(tmp_path):
    copy = _plant(tmp_path)
    # a lazy, relative import from the kernels room up to the trainer: the kind that is easy to miss
    (copy / "kernels" / "planted.py").write_text("def f():\n    from ..trainer import loop\n    return loop\n")
    graph = import_graph(copy)
    assert ("fastwidth.kernels.planted", "fastwidth.trainer.loop") in arrows_up(graph)
    assert "fastwidth.kernels.planted" in describe(graph)


def test_checker_catches_a_planted_circle(tmp_path):
    copy = _plant(tmp_path)
    # two modules of one room importing each other (`from . import x` form and a lazy one)
    (copy / "data" / "planted_a.py").write_text("from . import planted_b\n")
    (copy / "data" / "planted_b.py").write_text("def g():\n    import fastwidth.data.planted_a\n")
    graph = import_graph(copy)
    assert ["fastwidth.data.planted_a", "fastwidth.data.planted_b"] in circles(graph)
    assert not arrows_up({"fastwidth.data.planted_a": {"fastwidth.data.planted_b"}})


def test_checker_reads_every_import_form():
    mods = {"fastwidth", "fastwidth.a", "fastwidth.a.b", "fastwidth.a.c", "fastwidth.d"}
    src = ("import fastwidth.d\nfrom fastwidth.a import b, helper\nfrom .c import x\n"
           "def f():\n    from .. import d\n    import os\n")
    found = imports_of("fastwidth.a.b", _StringFile(src), mods, "fastwidth")  # type: ignore[arg-type]
    assert found == {"fastwidth.d", "fastwidth.a", "fastwidth.a.c"}, found  # b itself is no arrow


class _StringFile:
    """Enough of a Path for imports_of: a name and the text."""

    def __init__(self, text: str, name: str = "b.py"):
        self.text, self.name = text, name

    def read_text(self, encoding=None) -> str:
        return self.text

    def __str__(self) -> str:
        return self.name


@pytest.mark.parametrize("module,room", [("fastwidth.config", "errors/config"),
                                         ("fastwidth.config_schema", "errors/config"),
                                         ("fastwidth.kernels.norm", "kernels"),
                                         ("fastwidth.run.paths", "run"),
                                         ("fastwidth.cli", "cli"), ("fastwidth.data.cli", "data"),
                                         ("fastwidth", "api")])
def test_rooms(module, room):
    assert ROOMS[room_of(module)][0] == room
