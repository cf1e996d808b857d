"""The package's imports run one way — models/ and decoding/ → ops/ → triton/ | the CUDA
extension — with no cycle, read from the sources (every import, function-level ones too)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastverify"

# Lower layers never import higher ones; a module may import its own layer (without a cycle).
LAYERS = [
    ("base", ("fastverify._layout", "fastverify._backend", "fastverify._build_flags")),
    ("kernels", ("fastverify.triton", "fastverify._cuda", "fastverify.cpu")),
    ("ops", ("fastverify.ops",)),
    ("models", ("fastverify.models",)),
    ("decoding", ("fastverify.decoding",)),
    ("applications", ("fastverify.frspec", "fastverify.training", "fastverify.integrations", "fastverify.bench", "fastverify.compare",
                      "fastverify.cli", "fastverify.__main__", "fastverify")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """module -> the fastverify modules it imports (a ``from pkg import name`` of a
    submodule counts as importing that submodule)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "fastverify"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "fastverify":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.add(sub if sub in modules else target)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of test_architecture.LAYERS"
    return best[0]


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = [(m, t) for m, ts in graph.items() for t in ts if layer(t) > layer(m)]
    names = [n for n, _ in LAYERS]
    assert not upward, "\n".join(f"{m} ({names[layer(m)]}) imports {t} ({names[layer(t)]})" for m, t in upward)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("fastverify.ops.rejection") < layer("fastverify.decoding.generate")
    with pytest.raises(AssertionError):
        layer("elsewhere.module")
