"""The package's folders are its architecture: imports go one way, and the light parts stay light."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "parscale"
SHARED = {"errors", "atomic", "cache", "interrupt"}  # small helpers every part may use

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


def _modules_imported_within(part: str) -> dict[str, set[str]]:
    """For each module of a part, the modules of the same part it imports (anywhere in the file)."""
    mods = {p.stem for p in (PACKAGE / part).glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod in mods:
        for node in ast.walk(ast.parse((PACKAGE / part / f"{mod}.py").read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[:2] == ["parscale", part]:
                parts = node.module.split(".")
                names = parts[2:3] if len(parts) > 2 else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[2] for a in node.names if a.name.split(".")[:2] == ["parscale", part]
                         and a.name.count(".") >= 2]
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


@pytest.mark.parametrize("part", [p if p != "model" else pytest.param(
    p, marks=pytest.mark.xfail(strict=True, reason="model/auto.py and model/wrapper.py import each other"))
    for p in sorted(ALLOWED)])
def test_no_part_has_modules_that_import_each_other_in_a_circle(part):
    """Each folder reads top-down: no module reaches itself through the imports of its own part,
    at module level or inside functions."""
    graph = _modules_imported_within(part)
    circles = []
    for start in sorted(graph):
        seen, todo = set(), sorted(graph[start])
        while todo:
            mod = todo.pop()
            if mod == start:
                circles.append(start)
                break
            if mod not in seen:
                seen.add(mod)
                todo += sorted(graph[mod])
    assert not circles, f"{part}: {circles} import themselves through other modules of {part}"


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
                                    "parscale.cli.cost"])
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
