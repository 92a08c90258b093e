"""The soak (bench/soak.py) for a minute in CI: 20 simulated users on the Discord layer
with `rapport score` on a timer and a deploy and a rollback midway (issue 15)."""

from __future__ import annotations

import pytest

from bench.soak import run_soak
from bench.soak_checks import STALL_LIMIT_S

SECONDS = 60  # the run itself; setup (two tiny models, the tokenizer) adds ~15 s


@pytest.mark.alone
def test_a_minute_of_simulated_discord_traffic_loses_nothing_and_never_stalls(rapport_home):
    """0 lost turns, forget removes everything of that user and nothing of anyone else,
    votes equal the final reactions, replies follow the deploy and the rollback, and
    nothing blocking runs on the event loop (below). The deploy skips the gate
    (tests/test_deploy.py covers it; here the switch and the hot reload matter)."""
    outcome = run_soak(rapport_home, SECONDS, users=20, seed=0, score_every_s=10, gate=False)
    print("\n".join(" | ".join(str(c) for c in row) for row in outcome.rows))
    m = outcome.measures
    assert m["sent"] > 200 and m["lost"] == 0 and m["unanswered"] == 0
    assert m["forgets"] > 5 and m["forget_left"] == 0
    assert m["votes_wrong"] == 0 and m["wrong_version"] == 0 and m["switches"] == 2
    # The stall bound, as the part the bot's process controls: no stall, less the time
    # the kernel made the loop wait for a core, passed 100 ms (a blocking call: SQLite,
    # tokenizing, generating; a full collection; a thread holding the GIL), and no
    # callback spent 100 ms of CPU in one. The wall-clock stall is printed, and asserted
    # only through its parts: on a shared 2-core machine at nice 19 beside a benchmark
    # it is the wait for a core (load 9-18: 1.7-2.6 s of 1.9-2.9 s; bench/RESULTS.md).
    parts = {k: round(v * 1000) for k, v in m["stall_parts"].items()}
    assert m["stall_own_max"] <= STALL_LIMIT_S, (m["stall_own_max"], parts)
    assert m["loop_cpu_max"] <= STALL_LIMIT_S, (m["loop_cpu_max"], parts)
    others = [f for f in outcome.failures if not f.startswith("event loop: largest stall:")]
    assert not others, (others, parts)
