"""The learning bench's equal-KL rows (bench/learning_loop.py): which rows are compared
head to head, the budget each trains to, and the column the table gives them."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "learning_loop.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("learning_loop", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_at_equal_kl_are_paired_with_their_peer(bench):
    names = ["psi", "kto", "bc@psi", "psi@0.1", "bc@0.1", "kl_q@0.1", "bc@0.2"]
    assert bench.peers(names) == {"bc@psi": "psi", "bc@0.1": "psi@0.1", "kl_q@0.1": "psi@0.1"}


def test_a_budget_is_a_rows_last_training_kl_or_a_number(bench):
    assert bench.budget_of("psi", {"psi": {"last_kl": 0.123}}) == 0.123
    assert bench.budget_of("0.1", {}) == 0.1
    with pytest.raises(SystemExit, match="'pis' in an A@B row is neither a row before it nor a KL"):
        bench.budget_of("pis", {"psi": {"last_kl": 0.123}})


def test_the_table_shows_the_paired_difference_from_the_equal_kl_peer(bench):
    def interval(value):
        return {"value": value, "low": value - 0.07, "high": value + 0.07}

    def row(question, **extra):
        columns = ("bot_question", "kl_to_prior", "perplexity", "distinct_2")
        return {c: interval(question if c == "bot_question" else 0.5) for c in columns} | extra

    results = {
        "prior": row(0.6),
        "psi@0.1": row(0.7),
        "bc@0.1": row(
            0.8, versus={"row": "psi@0.1", "difference": {"bot_question": interval(0.1)}}
        ),
        "seconds": 1.0,
    }
    lines = bench.table("bot_question", results).splitlines()
    assert lines[0].endswith("| targeted - equal-KL peer's (paired) |")
    assert lines[1] == "|---" * 10 + "|"
    assert lines[-1].endswith("| 0.100 [0.030, 0.170] vs psi@0.1 |")
    assert lines[-2].endswith("| - |")
    without = bench.table("bot_question", {k: results[k] for k in ("prior", "psi@0.1")})
    assert "peer" not in without and without.splitlines()[1] == "|---" * 9 + "|"
