"""The package's folders are its architecture: imports go one way, and the light parts stay light."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "parscale"
SHARED = {"errors", "atomic", "cache", "interrupt", "progress", "machine"}  # small helpers every part may use

# Which parts each part may import (besides itself and the shared helpers), read from
# docs/architecture.md. The demo and the CLI sit on top and may use everything.
ALLOWED = {
    "law": set(),
    "cost": {"law", "model"},  # `measure` times real models, imported inside its functions
    "model": set(),
    "data": set(),
    "train": {"model", "data"},
    "serve": {"model"},
    "demo": {"model", "data", "train", "law", "cost"},
    "evaluate": {"model"},
    "cli": {"model", "data", "train", "law", "cost", "demo", "evaluate", "serve"},
}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported parscale part, at module level?) for every `parscale.X` import in a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "parscale":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("parscale.")]
        found += [(name, id(node) in top_level) for name in names]
    return found


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_go_one_way(part):
    bad = []
    for path in sorted((PACKAGE / part).rglob("*.py")):
        for name, _ in _imports(path):
            if name not in SHARED | {part} | ALLOWED[part]:
                bad.append(f"{path.relative_to(PACKAGE)} imports parscale.{name}")
    assert not bad, bad


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The parscale modules a file imports anywhere (inside functions too): `from parscale.model
    import wrapper` names the module parscale.model.wrapper, not the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parscale"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("parscale")}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("parscale")):
            found.add(node.args[0].value)
    return found


def _circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` (module -> modules it imports), or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_no_import_circle_inside_a_part(part):
    """Each folder reads top-down: no module imports, even inside a function, one that imports it back."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
             for p in (PACKAGE / part).rglob("*.py") if p.stem != "__init__"}
    graph = {m: {t for t in _module_imports(p, set(files)) if t in files and t != m} for m, p in files.items()}
    assert not (circle := _circle(graph)), " -> ".join(circle)


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _circle(graph) == ["a", "b", "c", "a"] and _circle({**graph, "c": {"d"}}) == []


def test_format_module_does_not_import_the_wrapper():
    # The checkpoint format is a leaf: the wrapper composes it, never the other way round.
    tree = ast.parse((PACKAGE / "model" / "format.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert not [m for m in modules + names if "wrapper" in m]


def test_cost_imports_the_model_only_inside_functions():
    for path in (PACKAGE / "cost").rglob("*.py"):
        assert not [n for n, top in _imports(path) if n == "model" and top], path


def test_every_part_has_a_docstring_that_says_what_lives_there():
    for part in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) >= 2, part


@pytest.mark.parametrize("module", ["parscale", "parscale.law.fitting", "parscale.law.points", "parscale.law.plot",
                                    "parscale.cost.roofline", "parscale.cost.compare", "parscale.cost.measure",
                                    "parscale.cost.plot", "parscale.model.config", "parscale.cli.fit",
                                    "parscale.cli.cost", "parscale.machine"])
def test_light_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", module


def test_public_api():
    code = ("from parscale import ParScaleConfig, ParScaleForCausalLM, to_parscale, UserError; "
            "from parscale.model import ParScaleConfig as C; assert C is ParScaleConfig")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_import_the_docs_show_works():
    root = PACKAGE.parents[1]
    lines = set()
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "benchmarks" / "README.md"]:
        lines |= {line.strip() for line in doc.read_text().splitlines()
                  if line.strip().startswith(("from parscale", "import parscale"))}
    assert lines  # the docs do show imports
    subprocess.run([sys.executable, "-c", "\n".join(sorted(lines))], check=True)


def test_test_modules_have_unique_names():
    """The test folders have no __init__.py, so pytest imports each test module by its bare name:
    two files of one name in two folders stop the whole collection."""
    from collections import Counter

    tests = Path(__file__).resolve().parent
    names = Counter(path.name for path in tests.rglob("test_*.py"))
    assert not [name for name, count in names.items() if count > 1]
