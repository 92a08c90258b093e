"""The packages stand in layers, and imports point down (README: "How it fits together").

Read from the source with ``ast`` (nothing is imported): every module of bot/, rewards/
and learner/ has a layer; an import of a higher layer, an import cycle, or an import
inside a function that is not for start-up time or a heavy optional dependency fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "rewards", "learner")

# Lowest first; a module may import its own layer and the layers before it.
LAYERS = {
    "ground": (
        "bot bot.errors bot.config bot.prompt bot.progress bot.files bot.migrations "
        "bot.model_files bot.store_data bot.store_ratings bot.store_safety bot.store "
        "bot.corpora bot.check bot.processes"
    ),
    "serving": "bot.safety bot.policy bot.session bot.terminal bot.discord_bot rewards.*",
    "learner": "learner.*",
    "loop": "bot.gate bot.registry bot.cli",
}

# Imports inside a function, and why: only these stay.
DEFERRED = {
    "bot.cli": "commands import the torch-loading modules they run (start-up time)",
    ("learner.pipeline", "learner.trl_train"): "trl loads only for kto, dpo and sft",
    ("rewards.score", "rewards.learned_reward"): "a reward model loads only when one is used",
}


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS.values()):
        for member in members.split():
            package = member.endswith(".*") and module.split(".")[0] == member[:-2]
            if module == member or package:
                return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and the README)")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def internal(name: str | None, known: dict) -> str | None:
    """The module of ours an import names (``from learner import runs`` -> learner.runs)."""
    if not name or name.split(".")[0] not in PACKAGES:
        return None
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path, known: dict) -> list[tuple[str, bool]]:
    """(module, at top level?) of every import of ours, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                base = child.module or ""
                names = [f"{base}.{a.name}" for a in child.names]
            else:
                inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, top and not inner)
                continue
            for name in names:
                module = internal(name, known)
                if module:
                    found.append((module, top))

    visit(tree, True)
    return found


KNOWN = modules()
GRAPH = {m: imports(p, KNOWN) for m, p in KNOWN.items()}


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_imports_point_down_the_layers(module):
    mine = layer_of(module)
    upward = [(m, list(LAYERS)[layer_of(m)]) for m, _ in GRAPH[module] if layer_of(m) > mine]
    assert not upward, f"{module} ({list(LAYERS)[mine]}) imports a higher layer: {upward}"


def test_no_import_inside_a_function_but_the_listed_ones():
    deferred = {
        (module, imported)
        for module, found in GRAPH.items()
        for imported, top in found
        if not top and imported != module
    }
    unexplained = sorted(
        (m, i) for m, i in deferred if m not in DEFERRED and (m, i) not in DEFERRED
    )
    assert not unexplained, f"imports inside functions with no listed reason: {unexplained}"


def test_no_import_cycles():
    top_level = {m: {i for i, top in found if top and i != m} for m, found in GRAPH.items()}
    for module in top_level:
        stack, seen = [(module, (module,))], set()
        while stack:
            current, path = stack.pop()
            for nxt in top_level[current]:
                assert nxt != module, f"import cycle: {' -> '.join((*path, nxt))}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))


def test_the_readme_draws_the_same_layers():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How it fits together", 1)[1].split("\n## ", 1)[0]
    for name, members in LAYERS.items():
        assert name in section, name
        for member in members.split()[1 if name == "ground" else 0 :]:  # not bot/__init__
            shown = member.replace(".*", "/").replace(".", "/")
            shown = shown if shown.endswith("/") else shown.split("/", 1)[1]
            assert shown in section, f"README's layer diagram does not name {member}"
