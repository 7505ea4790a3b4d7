"""The package's layers (README "Architecture"): nothing imports from a layer above its
own, and only the pipeline layer reads ml_collections configs. An AST walk over every
import statement, including imports inside functions."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "persona_jax"
# bottom to top; packages on one rank may not import each other either
LAYERS = [("errors", "io"), ("model",), ("steering",), ("runtime",), ("judges",),
          ("method",), ("finetune",), ("organism",), ("pipeline",)]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
EXEMPT = {"__init__", "testing"}  # the public facade and the test-model helper


def _top(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "persona_jax" and len(parts) > 1 else None


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "persona_jax":
                for a in node.names:
                    yield node.lineno, f"persona_jax.{a.name}"
            else:
                yield node.lineno, node.module


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        top = rel.parts[0].removesuffix(".py")
        if top in EXEMPT:
            continue
        yield path, top


def test_every_module_is_in_a_layer():
    tops = {top for _, top in _modules()}
    assert tops <= set(RANK), f"folders without a layer: {sorted(tops - set(RANK))}"


def test_no_import_from_a_layer_above():
    bad = []
    for path, top in _modules():
        for line, mod in _imports(path):
            other = _top(mod)
            if other is None or other == top or other in EXEMPT:
                continue
            if other not in RANK:
                bad.append(f"{path.relative_to(PKG)}:{line} imports unknown {mod}")
            elif RANK[other] >= RANK[top] and not (RANK[other] == RANK[top] == 0):
                bad.append(f"{path.relative_to(PKG)}:{line} ({top}) imports {mod} ({other})")
    assert not bad, "\n".join(bad)


def test_only_the_pipeline_reads_configs():
    bad = [f"{path.relative_to(PKG)}:{line}" for path, top in _modules() if top != "pipeline"
           for line, mod in _imports(path) if mod.split(".")[0] == "ml_collections"]
    assert not bad, bad


def test_the_check_can_fail(tmp_path):
    # a function-level import of a higher layer is seen, and ranks above its importer
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from persona_jax.pipeline import steps\n")
    (mod,) = [m for _, m in _imports(p)]
    assert _top(mod) == "pipeline" and RANK["pipeline"] > RANK["method"]


def test_no_import_cycle_between_modules():
    """Module-level graph inside the package (function-level imports included) has no
    cycle: runtime/engine.py and runtime/generate.py once imported each other."""
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name.endswith("__init__") or rel.name == "__init__":
            continue
        graph[name] = {m for _, m in _imports(path) if m.startswith("persona_jax.")}
    known = set(graph)
    graph = {k: {m for m in v if m in known and m != k} for k, v in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
