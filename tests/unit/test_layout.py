"""The package's layout: no import cycle between tip's modules (imports inside functions
count too), one place that picks the sampler, file names defined once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tipcli"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the tip modules it imports anywhere in its source (``from a.b import c``
    is an edge to a.b.c when that is a module, else to a.b), and to the packages above it
    that the importer is not inside (their ``__init__`` runs first)."""
    mods = modules()

    def target(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for full in imported:
                t = target(full) if full.startswith("tipcli") else None
                # importing a.b.c runs package a.b's __init__ first, unless the importer is
                # inside a.b (whose __init__ is then running already)
                while t and t != "tipcli" and not (name + ".").startswith(t + "."):
                    graph[name].add(t)
                    t = t.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_tipcli():
    graph = import_graph()
    # edges in functions count
    assert "tipcli.engines.vllm_engine" in graph["tipcli.engines.sampler"]
    assert cycles(graph) == []


def test_one_place_picks_the_sampler():
    """Only ``tipcli.engines.sampler`` imports a sampler implementation; everyone else asks it."""
    impls = {"tipcli.engines.hf", "tipcli.engines.vllm_engine"}
    users = {m for m, deps in import_graph().items() if deps & impls} - impls
    # build: a bare hf sampler
    assert users <= {"tipcli.engines.sampler", "tipcli.tasks.build"}, users


def _strings(path: Path) -> list[str]:
    """Every string literal of a module but its docstrings."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs]


def test_file_names_are_defined_once():
    """The names tip writes live in tipcli.store.layout; no other module spells them."""
    from tipcli.store import layout as stages

    exact = {stages.MANIFEST, stages.METRICS, stages.RESULTS, stages.ITERATION_ROW,
             stages.CHECKPOINTS, stages.ITERATION_PROMPTS}
    prefixes = ("shard-", "iter-", ".progress-")
    for name, path in modules().items():
        if name == "tipcli.store.layout":
            continue
        for text in _strings(path):
            assert text not in exact and not text.startswith(prefixes), (name, text)


def test_settings_reference_in_docs_is_up_to_date():
    """docs/configs.md's table of every setting is generated (python -m tipcli.docs)."""
    from tipcli import docs

    text = docs.DOC.read_text(encoding="utf-8")
    assert docs.rewritten(text) == text, "run `python -m tipcli.docs` (make docs)"
    assert "`--teacher-top-k`" in text and "`--sample-batch-size`" in text


def test_contributing_module_map_is_up_to_date():
    """CONTRIBUTING.md's module map is generated from the modules' docstrings."""
    from tipcli import docs

    text = docs.CONTRIBUTING.read_text(encoding="utf-8")
    assert docs.map_rewritten(text) == text, "run `python -m tipcli.docs` (make docs)"


def test_at_most_twelve_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top


def test_contributing_module_map_matches_the_package():
    """Every module of tipcli appears in CONTRIBUTING.md's map, and the map names no
    module that does not exist."""
    import re

    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    table = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for cell in re.findall(r"^\| (.+?) \|", table, re.M):
        for path in re.findall(r"`([\w/.]+)`", cell):
            listed.add(path)
    files = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
             if p.name not in ("__main__.py", "__init__.py") or p.parent != PACKAGE}
    covered = set()
    for entry in listed:
        target = PACKAGE / entry.removeprefix("tipcli/")
        assert target.exists(), f"CONTRIBUTING.md lists {entry}, which does not exist"
        covered |= ({str(p.relative_to(PACKAGE.parent)) for p in target.rglob("*.py")}
                    if target.is_dir() else {str(target.relative_to(PACKAGE.parent))})
    missing = sorted(files - covered)
    assert missing == [], f"modules missing from CONTRIBUTING.md's map: {missing}"
