"""The package's import graph, read from the source (function-local imports included): it has
no cycle, and nothing below the command layer imports it."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "lmjax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the lmjax modules it imports anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the module pkg.sub when there is one.
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                targets.update(subs or {node.module})
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "lmjax.model.transformer" in graph["lmjax.model.objective"]
    assert "lmjax.train.run" in graph["lmjax.commands.train"]  # imported inside a function


def test_lmjax_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("top", ["lmjax.cli", "lmjax.commands"])
def test_only_the_command_layer_imports_commands_and_cli(top):
    graph = import_graph()
    above = ("lmjax.cli", "lmjax.__main__", "lmjax.commands")
    offenders = sorted(
        m
        for m, targets in graph.items()
        if not m.startswith(above) and any(t == top or t.startswith(top + ".") for t in targets)
    )
    assert not offenders, f"{offenders} import {top}: library modules must not depend on it"


def test_lmjax_modules_are_imported_at_the_top_of_each_module():
    """A function-local `lmjax` import hides an edge of the graph from a reader; only the
    command modules import the library late, inside the functions that run a command (so
    building the parser, `lmjax --help`, loads none of it)."""
    late = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE / "commands":
            continue
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                late += [
                    f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    for node in ast.walk(fn)
                    if isinstance(node, ast.ImportFrom)
                    and (node.module or "").startswith("lmjax")
                    or isinstance(node, ast.Import)
                    and any(a.name.startswith("lmjax") for a in node.names)
                ]
    assert not late, f"function-local lmjax imports: {late}"


def test_building_the_parser_loads_neither_jax_nor_tensorflow():
    """`lmjax --help` (every command's parser) in a fresh process: no jax, TensorFlow, orbax,
    Beam or TensorStore among the modules it loaded."""
    code = (
        "import sys; from lmjax import cli; cli.build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    heavy = ["jax", "jaxlib", "tensorflow", "orbax", "apache_beam", "tensorstore", "flax"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *heavy], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# Which floors each floor may import (besides itself and the top-level modules: config, errors,
# batch, hardware and the other modules directly under lmjax/, which import only each other).
# A floor's __init__.py docstring states the same rule for its readers.
FLOORS = {
    "parallel": set(),
    "model": {"parallel"},
    "data": set(),
    "observe": {"model"},  # FLOPs per token for throughput and MFU
    "convert": {"model", "parallel"},  # gathers of sharded params across processes
    "checkpoint": {"model", "parallel", "data"},
    "inference": {"model", "parallel", "data", "checkpoint"},
    "train": {"model", "parallel", "data", "checkpoint", "inference", "observe"},
    "tools": {
        "model",
        "parallel",
        "data",
        "checkpoint",
        "inference",
        "observe",
        "train",
        "convert",
    },
    "experiments": set(),
}
COMMAND_LAYER = {"cli", "__main__", "commands"}


def floor_of(module: str) -> str:
    """lmjax.model.attention -> 'model'; lmjax.config -> 'top'; lmjax.cli -> 'cli'."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"
    name = parts[1]
    return name if name in FLOORS or name in COMMAND_LAYER else "top"


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        src = floor_of(module)
        if src in COMMAND_LAYER:
            continue
        allowed = {src, "top"} | FLOORS.get(src, set())
        bad += [f"{module} -> {t}" for t in sorted(targets) if floor_of(t) not in allowed]
    return bad


def test_floor_rules_catch_an_upward_import():
    assert floor_violations({"lmjax.model.transformer": {"lmjax.train.trainer"}})
    assert floor_violations({"lmjax.config": {"lmjax.model.transformer"}})
    assert not floor_violations({"lmjax.train.run": {"lmjax.model.transformer", "lmjax.config"}})


def test_floors_import_only_the_floors_below_them():
    bad = floor_violations(import_graph())
    assert not bad, f"imports against the floors (see FLOORS): {bad}"


def test_every_floor_says_what_it_may_import():
    for name in FLOORS:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "import" in doc, f"lmjax/{name}/__init__.py must state what the floor may import"


def test_floor_init_files_re_export_nothing():
    for init in PACKAGE.rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        stray = [
            n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        ]
        if init.parent == PACKAGE:  # lmjax/__init__.py carries only __version__
            stray = [
                n
                for n in stray
                if not (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__version__")
            ]
        assert not stray, f"{init.relative_to(PACKAGE.parent)} must hold only its docstring"


# The config in three modules: the schema (lmjax.config) imports no lmjax module, so a preset
# or a user's experiment file, which imports only it, loads nothing else; the checks and the
# --set parsing read only the schema.
CONFIG_MODULES = {
    "lmjax.config": set(),
    "lmjax.config_checks": {"lmjax.config"},
    "lmjax.config_overrides": {"lmjax.config"},
}


def test_the_config_schema_imports_nothing_and_its_checks_and_parsing_only_the_schema():
    graph = import_graph()
    assert {m: graph[m] for m in CONFIG_MODULES} == CONFIG_MODULES
    presets = {m: t for m, t in graph.items() if m.startswith("lmjax.experiments.")}
    assert presets and all(t <= {"lmjax.config"} for t in presets.values()), presets
