"""The v2 layout: no import cycles, imports go one way between sub-packages, ComfyUI never loads the lab.

The import graph is read from the source (every import, function-level ones included), so a cycle hidden
behind a lazy import fails here even though Python would import the modules without complaint.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sub-packages (and top-level modules) of trainer/, lowest first: a module may import only from its own
# entry or from entries listed before it. The lab and the CLI sit on top of everything.
LAYERS = [
    "errors",
    "files",
    "config",
    "events",
    "cpu_malloc",
    "stop_signals",
    "base_models",
    "pictures",
    "inference",
    "formats",
    "data",
    "training",
    "jobs",
    "lab",
    "cli",
    "__main__",
    "",
]


def module_files() -> dict[str, Path]:
    mods = {}
    for top in ("trainer", "nodes"):
        for path in (ROOT / top).rglob("*.py"):
            if "assets" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != mod and not mod.startswith(target + "."):
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1] if module.count(".") else "")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_trainer_imports_go_one_way():
    wrong = []
    for mod, targets in import_graph().items():
        if not mod.startswith("trainer"):
            continue
        for target in targets:
            if target.startswith("nodes"):
                wrong.append(f"{mod} imports {target}: trainer/ never imports nodes/")
            elif target.startswith("trainer.") and layer(target) > layer(mod):
                wrong.append(f"{mod} imports {target}, which sits above it")
    assert wrong == []


def test_nodes_never_import_the_lab():
    graph = import_graph()
    seen, todo = set(), ["nodes"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph[mod])
    assert {m for m in seen if m.startswith("trainer.lab")} == set()
    assert "trainer.cli" not in seen


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in module_files() if m.startswith("trainer") and not m.endswith("__main__"))
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    result = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
