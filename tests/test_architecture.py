"""The import graph of ggtalker_cli against the layers docs/architecture.md states.

Parses every module's imports (top-level and inside functions: a lazy import is a dependency
too) and asserts: every module sits in exactly one layer of the table; no import circle; at most
one import from a lower layer to a higher one; only the entry layer imports the verbs
(`stages/`), the verbs do not import each other, tests and bench scripts call a verb only through
its `run` (its internals belong in the library), and every verb is thin: no class, no public name
but `run`, at most MAX_VERB_LINES lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ggtalker_cli"
MAX_UPWARD = 1


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (`from . import x` names module x, not the package)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m not in (name, "ggtalker_cli")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layers() -> dict[str, int]:
    """Module -> layer number, from the table under '## Layers' in docs/architecture.md."""
    text = (REPO / "docs" / "architecture.md").read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in re.findall(r"^\| (\d+) \|[^|]*\|([^|]*)\|", text, re.M):
        for module in re.findall(r"`([\w.*]+)`", row[1]):
            table[f"ggtalker_cli.{module}"] = int(row[0])
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    if module in table:
        return table[module]
    wildcard = [layer for pattern, layer in table.items() if pattern.endswith(".*") and (module + ".").startswith(pattern[:-1])]
    return wildcard[0] if wildcard else None


def test_every_module_is_in_one_stated_layer():
    table = layers()
    assert len(set(table.values())) >= 5, "the layer table in docs/architecture.md did not parse"
    unplaced = sorted(m for m in modules() if m != "ggtalker_cli" and layer_of(m, table) is None)
    assert not unplaced, f"add these modules to the layer table in docs/architecture.md: {unplaced}"


def test_no_import_circle():
    edges, state, stack = graph(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_at_most_one_upward_import():
    table = layers()
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if a != "ggtalker_cli" and layer_of(a, table) is not None and (layer_of(b, table) or 0) > layer_of(a, table)]
    assert len(upward) <= MAX_UPWARD, f"imports from a lower layer to a higher one: {sorted(upward)}"


def test_only_the_entry_layer_imports_the_verbs():
    table = layers()
    top = max(table.values())
    wrong = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                   if b.startswith("ggtalker_cli.stages.") and (a.startswith("ggtalker_cli.stages.") or layer_of(a, table) != top))
    assert not wrong, f"a verb is imported by a module other than the entry layer: {wrong}"


def test_tests_and_bench_call_verbs_only_through_run():
    """A test or bench script that needs a verb's internals (calls them, monkeypatches them)
    says they belong in the library: it reaches a verb through `run` or the CLI only."""
    wrong = []
    for path in sorted([*(REPO / "bench").glob("*.py"), *(REPO / "tests").glob("*.py")]):
        tree, where = ast.parse(path.read_text()), path.relative_to(REPO)
        verbs = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ggtalker_cli.stages"):
                if node.module != "ggtalker_cli.stages":
                    wrong.append(f"{where}: from {node.module} import ...")
                verbs.update(alias.asname or alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                wrong += [f"{where}: import {alias.name}" for alias in node.names if alias.name.startswith("ggtalker_cli.stages.")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in verbs and node.attr != "run":
                wrong.append(f"{where}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Call) and any(isinstance(a, ast.Name) and a.id in verbs for a in node.args):
                wrong.append(f"{where}: {ast.unparse(node)[:80]}")  # a verb module handed to a call: setattr(verb, ...)
    assert not wrong, f"tests or bench scripts reach into verbs (move what they need into the library): {wrong}"


MAX_VERB_LINES = 250


def test_verbs_are_thin():
    """Every stages/*.py is a verb: no class, no public name but `run`, at most MAX_VERB_LINES
    lines; the work it orders is in the library modules."""
    wrong = []
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text()
        tree = ast.parse(text)
        wrong += [f"{path.name}: class {node.name}" for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
        names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        names += [target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for target in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(target, ast.Name)]
        if "run" not in names:
            wrong.append(f"{path.name}: no run()")
        wrong += [f"{path.name}: public {name}" for name in names if name != "run" and not name.startswith("_")]
        if len(text.splitlines()) > MAX_VERB_LINES:
            wrong.append(f"{path.name}: {len(text.splitlines())} lines")
    assert not wrong, f"verbs that are not thin (move it into a library module): {wrong}"


# the A2E rewrite (branch a2e) moves its prior and adaptation trainers onto training.Loop
LOOP_PENDING: set[str] = set()


def test_every_trainer_runs_on_the_shared_loop():
    """A module that steps an optimiser (calls .backward()) does it inside training.Loop: one
    place for interruption, checkpoints, divergence checks and resume."""
    mods = modules()
    own = []
    for name, path in mods.items():
        calls = {node.func.attr for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        on_loop = "ggtalker_cli.training" in imports(name, path, set(mods)) and "training.Loop(" in path.read_text()
        if "backward" in calls and not on_loop and name not in LOOP_PENDING:
            own.append(name)
    assert not own, f"training loops outside training.Loop: {own}"
