"""The package's module graph has no cycles and keeps its layers apart.

Read statically (``ast``) from the source of ``miras_pretrain`` and ``miras_kernels`` (folder
``kernels/``), counting every import -- module level and inside functions, since a lazy import
that closes a loop is still a loop for the reader. ``from pkg import name`` counts as importing
``pkg.name`` when that is a module, else ``pkg`` itself (whose ``__init__`` runs).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# import name -> folder
PACKAGES = {"miras_pretrain": ROOT / "miras_pretrain", "miras_kernels": ROOT / "kernels"}


def _modules() -> dict[str, pathlib.Path]:
    mods: dict[str, pathlib.Path] = {}
    for name, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in mods else source)
            for target in targets:
                dep = known(target)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_both_packages():
    graph = _graph()
    assert "miras_kernels.api" in graph and "miras_pretrain.model.lm" in graph
    assert "miras_kernels" in graph["miras_pretrain.model.miras_mixer"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_layers_point_one_way():
    """The operator never imports the trainer's package, and the model never imports the
    parallel runtime (it receives its parallel layout instead)."""
    graph = _graph()
    bad = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
           if m.startswith("miras_kernels") and d.startswith("miras_pretrain")]
    runtime = ("miras_pretrain.parallel", "miras_pretrain.train")
    bad += [f"{m} -> {d}" for m, deps in graph.items() for d in deps
            if m.startswith("miras_pretrain.model") and d.startswith(runtime)
            and d != "miras_pretrain.parallel.layout"]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_readme_layout_names_every_package():
    """The README's layout table names every package folder (so it keeps matching the tree)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):]
    folders = {"kernels/", "launch/", "configs/", "tests/", "tools/", "docs/"}
    folders |= {f"miras_pretrain/{p.parent.name}/" for p in (ROOT / "miras_pretrain").glob("*/__init__.py")}
    folders |= {f"{p.parent.name}/" for p in (ROOT / "kernels").glob("*/__init__.py")}
    missing = sorted(f for f in folders if f"`{f}" not in table and f" {f}" not in table)
    assert not missing, f"README.md's layout table does not name {missing}"
