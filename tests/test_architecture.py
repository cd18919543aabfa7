"""The package's structure: layers that only import downwards, no import cycle anywhere, and
function-level imports only for the optional heavy dependency (TensorFlow Datasets).

The graph is read from the source (module-level and function-level imports alike), so a
cycle hidden inside a function counts."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "t2i_mia"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("foundation", {"t2i_mia", "t2i_mia.errors", "t2i_mia.config", "t2i_mia.timing"}),
    ("parallel", {"t2i_mia.parallel", "t2i_mia.checkpoint"}),
    ("data", {"t2i_mia.data"}),
    ("models", {"t2i_mia.models"}),
    ("training", {"t2i_mia.training"}),
    ("targets", {"t2i_mia.targets"}),
    ("adversary", {"t2i_mia.adversary"}),
    ("report", {"t2i_mia.report"}),
    ("pipeline", {"t2i_mia.pipeline"}),
    ("entry points", {"t2i_mia.cli", "t2i_mia.attack", "t2i_mia.train", "t2i_mia.generate",
                      "t2i_mia.pretrain", "t2i_mia.report.__main__"}),
]
# optional dependencies heavy enough to import only where used (--data coco)
LAZY_OK = {"tensorflow_datasets", "tensorflow"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _graph():
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges, lazy = {}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        top = {id(n) for n in tree.body}
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".")[:len(name.split(".")) - node.level
                                             + (path.name == "__init__.py")]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if id(node) not in top and targets[0].split(".")[0] not in LAZY_OK:
                lazy.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {targets[0]}")
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        edges[name] = deps
    return files, edges, lazy


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or (p != "t2i_mia" and module.startswith(p + ".")):
                # the longest prefix wins (report.__main__ is an entry point)
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    assert best is not None, f"{module}: in no layer of tests/test_architecture.py"
    return best[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    _, edges, _ = _graph()
    # a package's __init__ re-exporting its submodules is not a cycle
    g = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")}
         for m, deps in edges.items()}
    assert _cycles(g) == []


def test_layers_only_import_downwards_and_form_no_cycle():
    _, edges, _ = _graph()
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in sorted(edges.items()) for d in sorted(deps)
              if _layer(d) > _layer(m)]
    assert upward == []
    layer_graph = {}
    for m, deps in edges.items():
        layer_graph.setdefault(_layer(m), set()).update(
            _layer(d) for d in deps if _layer(d) != _layer(m))
    assert _cycles(layer_graph) == []


def test_function_level_imports_only_for_optional_heavy_dependencies():
    _, _, lazy = _graph()
    assert lazy == []


@pytest.mark.parametrize("injected", ["t2i_mia.pipeline.audit", "t2i_mia.adversary.features"])
def test_the_checks_fire_on_an_injected_upward_import(injected, monkeypatch):
    """The checks are not vacuous: an import of a higher layer from models is caught."""
    files, edges, _ = _graph()
    edges = {m: set(d) for m, d in edges.items()}
    edges["t2i_mia.models.unet"].add(injected)
    assert any(_layer(d) > _layer(m) for m, deps in edges.items() for d in deps)
    if injected == "t2i_mia.adversary.features":
        edges[injected].add("t2i_mia.models.unet")  # and a cycle through it
        g = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")}
             for m, deps in edges.items()}
        assert _cycles(g)
