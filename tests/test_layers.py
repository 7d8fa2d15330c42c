"""lite-sft's layers: imports point down, never up or sideways, and no module imports another in a circle.

    core -> tasks -> demo -> modeling -> train | export -> serve -> bench -> cli

Read from the source with `ast`, so an import inside a function counts as much as one at the top (an
in-function import is a cycle hiding from the interpreter until its code path runs). import-linter would state
the same contract, but grimp, which builds its graph, finds modules by walking the top package's folder: it
sees 34 modules of `lite_sft` and none of `lite_sft.export` or `lite_sft.serve`, which install from export/
and serve/ (pyproject's package-dir), so it could not check the boundary that matters most.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lite_sft": ROOT / "lite_sft", "lite_sft.export": ROOT / "export", "lite_sft.serve": ROOT / "serve"}

# Bottom to top. A module may import modules of its own group and of any level below; the groups of one
# level (train and export) are siblings that never import each other. A module is placed by the longest
# prefix that names it.
LAYERS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("core", ("lite_sft", "lite_sft.errors", "lite_sft.taskspec", "lite_sft.config", "lite_sft.artifacts", "lite_sft.adapters",
               "lite_sft.stops", "lite_sft.report", "lite_sft.assets", "lite_sft.config_io", "lite_sft.options")),),
    (("tasks", ("lite_sft.tasks",)),),
    (("demo", ("lite_sft.tiny",)),),
    (("modeling", ("lite_sft.model", "lite_sft.plan")),),
    (("train", ("lite_sft.train", "lite_sft.checkpoint", "lite_sft.evaluate", "lite_sft.generate",
                "lite_sft.inspect_data", "lite_sft.rundir", "lite_sft.validation")),
     ("export", ("lite_sft.export",))),
    (("serve", ("lite_sft.serve",)),),
    (("bench", ("lite_sft.serve.bench", "lite_sft.serve.bench_candidates", "lite_sft.serve.bench_measure",
                "lite_sft.serve.bench_report", "lite_sft.serve.loadtest")),),
    (("cli", ("lite_sft.cli", "lite_sft.cli_options", "lite_sft.cli_run", "lite_sft.cli_deploy", "lite_sft.__main__")),),
)
# Pairs a layer may not import although it sits above: serving works on an exported (or Hugging Face) model
# folder and token ids, and never runs training or export code (bench too: it loads a tuned run with modeling).
FORBIDDEN = {("serve", "train"), ("serve", "export"), ("bench", "train"), ("bench", "export")}
# Where an in-function import of lite-sft's own modules is the design: the CLI imports each command's library
# lazily so that `lite-sft --help` answers without loading torch.
LAZY_IMPORTERS = ("lite_sft.cli", "lite_sft.__main__")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join([prefix, *parts]), path)
    return found


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(module of ours imported, line, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name and target.startswith("lite_sft"):
                nested = id(node) not in top and not _type_checking_only(tree, node)
                found.append((target, node.lineno, nested))
    return found


def _type_checking_only(tree: ast.Module, node: ast.AST) -> bool:
    for block in tree.body:
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING"):
            if any(child is node for child in ast.walk(block)):
                return True
    return False


def layer_of(name: str) -> tuple[int, str]:
    best = (-1, "", "")
    for level, groups in enumerate(LAYERS):
        for group, prefixes in groups:
            for prefix in prefixes:
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best[2]):
                    best = (level, group, prefix)
    return best[0], best[1]


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if layer_of(name)[0] < 0]
    assert not unplaced, f"give these modules a layer in tests/test_layers.py LAYERS: {unplaced}"


def test_imports_point_down():
    known = modules()
    wrong = []
    for name, found in graph().items():
        level, group = layer_of(name)
        for target, line, _ in found:
            t_level, t_group = layer_of(target)
            if t_level > level or (t_level == level and t_group != group) or (group, t_group) in FORBIDDEN:
                wrong.append(f"{known[name].relative_to(ROOT)}:{line} {name} ({group}) imports {target} ({t_group})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(dict.fromkeys(wrong))


def test_no_import_cycle():
    """Counting imports inside functions: Tarjan's strongly connected components of the whole graph."""
    edges = defaultdict(set)
    for name, found in graph().items():
        edges[name].update(target for target, _, _ in found)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(component))

    for name in modules():
        if name not in index:
            visit(name)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_no_in_function_import_of_our_own_modules():
    known = modules()
    nested = [f"{known[name].relative_to(ROOT)}:{line} imports {target} inside a function"
              for name, found in graph().items() if not name.startswith(LAZY_IMPORTERS)
              for target, line, inside in found if inside]
    assert not nested, "move these imports to the top of the module:\n" + "\n".join(dict.fromkeys(nested))


def test_module_sizes():
    big = {str(path.relative_to(ROOT)): n for path in modules().values()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


@pytest.mark.parametrize("name", ["lite_sft.errors", "lite_sft.taskspec"])
def test_core_roots_import_nothing_of_ours_but_core(name):
    level, _ = layer_of(name)
    assert level == 0
    assert all(layer_of(target)[0] == 0 for target, _, _ in graph()[name])
