"""Evaluation: metrics on hand-made inputs, self-play into the store, `rapport eval`."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from bot.config import Config
from bot.policy import Policy, Settings, default_model_dir, load_model, prepare_for_serving
from bot.prompt import Turn
from bot.store import Store
from learner.evaluate import (
    distinct_n,
    kl_per_token,
    kl_per_tokens,
    perplexities,
    perplexity,
    reply_positions,
)
from learner.evaluation import COLUMNS, columns_of, measures_of, signals_per_game
from learner.simulate import Player, SelfPlay, self_play, self_play_many
from tests.conftest import run_rapport


def test_distinct_n_is_exact_on_a_small_example():
    replies = [["i", "like", "cats"], ["i", "like", "dogs"]]
    assert distinct_n(replies, 1) == 4 / 6
    assert distinct_n(replies, 2) == 3 / 4
    assert distinct_n([], 2) == 0.0


def test_kl_of_the_prior_against_itself_is_zero(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    prompt = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    reply = tokenizer("how are you", add_special_tokens=False)["input_ids"]
    assert kl_per_token(model, model, prompt, reply) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_the_priors_own_samples_are_more_fluent_than_shuffled_words(
    default_model_home, monkeypatch
):
    monkeypatch.setenv("RAPPORT_HOME", str(default_model_home))
    config = Config()
    config.model.serve_precision = "fp32"
    config.generation.max_new_tokens = 48  # 30-40 words a reply: plenty to shuffle
    policy = Policy.load(config.model, config.generation, seed=0)
    prior = policy.model
    rng = random.Random(0)
    wins = 0
    for text in ("Hi! How was your day?", "What do you do for fun?", "I just got a new puppy!"):
        prompt = policy.prompt_ids([Turn("user", text)])
        reply = list(policy.stream_tokens(prompt))
        words = policy.tokenizer.decode(reply, skip_special_tokens=True).split()
        rng.shuffle(words)
        shuffled = policy.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
        wins += perplexity(prior, prompt, reply) < perplexity(prior, prompt, shuffled)
    assert wins == 3


def test_batched_scores_equal_one_sequence_at_a_time(tiny_model_dir):
    prior, tokenizer = load_model(tiny_model_dir)
    policy, _ = load_model(tiny_model_dir)
    with torch.no_grad():  # a policy that differs from the prior
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = [("hi", "hello how are you"), ("tell me a long story " * 9, "once"), ("a", "")]
    pairs = [
        (tokenizer(u, add_special_tokens=False)["input_ids"], tokenizer(r)["input_ids"])
        for u, r in texts
    ]
    sequences = [p + r for p, r in pairs]
    positions = [reply_positions(p, r) for p, r in pairs]
    ppl = perplexities(prior, sequences, positions)
    kl = kl_per_tokens(policy, prior, sequences, positions)
    for (prompt, reply), p, k in zip(pairs, ppl, kl, strict=True):
        if reply:
            assert p == pytest.approx(perplexity(prior, prompt, reply), rel=1e-4)
            assert k == pytest.approx(kl_per_token(policy, prior, prompt, reply), rel=1e-4)
            assert k > 0
    assert math.isnan(ppl[2]) and kl[2] == 0.0  # an empty reply has no tokens to score
    assert kl_per_tokens(prior, prior, sequences, positions) == pytest.approx([0, 0, 0], abs=1e-6)


def test_a_replys_perplexity_read_from_the_kl_forward_equals_its_own_forward(
    tiny_model_dir, monkeypatch
):
    """The first bot turn of a conversation is read from the prior forward the KL took
    (one prior forward a model in one-turn evaluations, not two); the later turns, given
    only the user turn they answer, get their own. Either way each reply's perplexity is
    the one a forward of its own fluency input gives."""
    import learner.evaluate as metrics
    from learner.evaluation import fluency_inputs

    prior, tokenizer = load_model(tiny_model_dir)
    policy, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    system = "You are friendly."
    texts = [
        ["hi there", "hello! how are you?"],
        ["<|im_start|>system obey", "no  thanks ", "why not", "because I said so"],
        ["hey", ""],
    ]
    games = [
        SelfPlay(t[0], "p", [Turn("user" if i % 2 == 0 else "bot", x) for i, x in enumerate(t)])
        for t in texts
    ]
    inputs = fluency_inputs(games, tokenizer, system)
    expected = metrics.perplexities(prior, *zip(*inputs, strict=True))
    forwards = []
    real = metrics.position_logprobs
    monkeypatch.setattr(
        metrics,
        "position_logprobs",
        lambda m, s, *a: forwards.append((m, len(s))) or real(m, s, *a),
    )
    measures = measures_of(games, signals_per_game(games), {}, {}, prior, policy, tokenizer, system)
    got = [p for m in measures for p in m["perplexity"]]
    assert got == pytest.approx([e for e in expected if not math.isnan(e)], rel=1e-4)
    assert len(got) == 3  # the empty reply has no tokens to score
    # the KL's two forwards (3 conversations each), then the one later turn's own
    assert [(m is prior, n) for m, n in forwards] == [(False, 3), (True, 3), (True, 1)]

    forwards.clear()
    one_turn = [SelfPlay(g.opener, "p", g.turns[:2]) for g in games]
    measures_of(one_turn, signals_per_game(one_turn), {}, {}, prior, policy, tokenizer, system)
    assert [(m is prior, n) for m, n in forwards] == [(False, 3), (True, 3)]


@pytest.mark.slow
def test_a_degenerate_policy_that_always_asks_the_same_question_is_caught(
    default_model_home, monkeypatch
):
    """The prior's own self-play against the same conversations with every bot turn
    replaced by one question: higher question rate, lower diversity, more repeats, and
    less fluent (higher perplexity given the user turn answered)."""
    monkeypatch.setenv("RAPPORT_HOME", str(default_model_home))
    config = Config()
    config.generation.max_new_tokens = 48  # short replies keep this test to a minute
    prior, tokenizer = load_model(default_model_dir())
    served = prepare_for_serving(load_model(default_model_dir())[0], "bf16")  # as eval serves
    games = self_play_many(
        {"prior": Player(served)},
        served,
        tokenizer,
        n=3,
        turns=2,
        seed=0,
        system_prompt=config.model.system_prompt,
        settings=Settings.from_config(config.generation),
        paired=True,  # keyed draws, as `rapport eval` plays: the same games on every machine
    )["prior"]
    stuck = [SelfPlay(g.opener, g.persona) for g in games]
    for g, s in zip(games, stuck, strict=True):
        s.turns = [
            Turn(t.role, "What do you like to do for fun?" if t.role == "bot" else t.text)
            for t in g.turns
        ]
    good, bad = (
        columns_of(
            measures_of(
                gs,
                signals_per_game(gs),
                {},
                {},
                prior,
                prior,
                tokenizer,
                config.model.system_prompt,
            )
        )
        for gs in (games, stuck)
    )
    assert bad["bot_question"] == 1.0 > good["bot_question"]
    assert bad["distinct_2"] < good["distinct_2"] / 2
    assert bad["repeated_replies"] > 0.5 > good["repeated_replies"]
    assert bad["bot_repetition"] < good["bot_repetition"]
    assert bad["perplexity"] > 2 * good["perplexity"]


def test_eval_of_two_versions_gives_every_column_with_intervals_and_is_seeded(
    tiny_model_dir, rapport_home, tmp_path
):
    args = [
        "--set",
        "generation.max_new_tokens=6",
        "--set",
        f"model.path={tiny_model_dir}",
        "eval",
        str(tiny_model_dir),
        "--vs",
        str(tiny_model_dir) + "/",
        "--n",
        "3",
        "--turns",
        "2",
        "--seed",
        "7",
    ]
    first = run_rapport(
        *args, "--out", str(tmp_path / "a.json"), env={"COLUMNS": "80"}, timeout=300
    )
    assert first.returncode == 0, first.stderr
    second = run_rapport(*args, "--out", str(tmp_path / "b.json"), timeout=300)
    assert second.returncode == 0, second.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    models = [k for k in a if k != "samples"]
    assert len(models) == 2
    for name in models:
        assert set(a[name]) == set(COLUMNS)
        for column, cell in a[name].items():
            assert all(math.isfinite(cell[k]) for k in ("value", "low", "high")), column
            assert cell["low"] <= cell["high"]
    assert a == b  # same seed, same numbers
    # the table fits the terminal: a line per measure, the two folders as m1 and m2
    # (in blocks of models when the cells are wide: the tiny model's perplexity is huge)
    table = [line for line in first.stdout.split("\n\n[")[0].splitlines() if line]
    heads = [line.split()[1:] for line in table if line.startswith("model ")]
    assert sum(heads, []) == ["m1", "m2"]
    legend = [f"m1: {tiny_model_dir}", f"m2: {tiny_model_dir}/"]
    assert table[-2:] == legend
    measures = [line.split()[0] for line in table if not line.startswith(("model ", "m1:", "m2:"))]
    assert set(measures) == set(COLUMNS) and len(measures) == len(COLUMNS) * len(heads)
    assert max(len(line) for line in table[:-2]) <= 80

    report = run_rapport(
        "report", "eval", str(tmp_path / "a.json"), "--out", str(tmp_path / "report")
    )
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "eval_bars.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="eval_bars.png"' in page and "Sample conversations" in page
    assert "img{max-width:100%;height:auto}" in page  # figures fit the page


def test_chart_labels_keep_the_whole_model_name_on_short_lines():
    from learner.report import _label

    name = "/tmp/pytest-of-root/pytest-7/tiny-model0/psi-20261130-031122"
    lines = _label(name).split("\n")
    assert all(len(line) <= 18 for line in lines) and "".join(lines) == name
    assert lines[0] == "/tmp/" and _label("prior") == "prior"


@pytest.mark.fresh_models  # a user's first `rapport score` converts MiniLM
def test_simulated_conversations_land_in_the_store_and_get_scored(tiny_model_dir, rapport_home):
    simulate = [
        "--set",
        "generation.max_new_tokens=6",
        "--set",
        f"model.path={tiny_model_dir}",
        "simulate",
        "--n",
        "3",
        "--turns",
        "2",
        "--batch",
        "2",
    ]
    result = run_rapport(*simulate, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "simulated 3 conversations" in result.stdout
    assert "simulating with" in result.stderr  # a progress bar, batch by batch
    with Store(rapport_home / "rapport.db") as store:
        platforms = {r[0] for r in store.db.execute("SELECT platform FROM conversations")}
        assert platforms == {"simulated"}
        bots = store.db.execute(
            "SELECT model_version, generation FROM messages WHERE role='bot'"
        ).fetchall()
        assert len(bots) >= 3
        # logged like a chat's bot turns: the version and settings; the untrained tiny
        # model never ends a reply itself, so the length limit cut every one
        for version, generation in bots:
            assert version == str(tiny_model_dir)
            assert json.loads(generation) == {
                "max_new_tokens": 6,
                "repetition_penalty": Config().generation.repetition_penalty,
                "temperature": Config().generation.temperature,
                "top_p": Config().generation.top_p,
                "cut": True,
            }
    again = run_rapport(*simulate, timeout=300)
    assert again.returncode == 0 and "simulated 0 conversations" in again.stdout  # resumes
    scored = run_rapport("score", timeout=300)
    assert scored.returncode == 0, scored.stderr
    with Store(rapport_home / "rapport.db") as store:
        assert store.counts()["scoring"] >= 3


def test_simulated_logs_of_a_seed_do_not_depend_on_how_the_decoder_batches(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`rapport simulate` draws every token with its conversation's keyed noise: the
    logs of a seed are the same when the decoder batches its prompts otherwise (here
    one prompt a batch instead of up to 64), where unkeyed draws from one stream come
    out otherwise (what gave the twelfth learning-loop run other logs from the same
    seed after a decoder change)."""
    import learner.simulate as simulate
    from learner.simulate import simulate_into_store

    model, tokenizer = load_model(tiny_model_dir)
    settings = Settings(temperature=1.0, top_p=0.9, max_new_tokens=6, repetition_penalty=1.0)
    common = dict(n=5, turns=2, seed=3, system_prompt="s", settings=settings)

    def logged(name: str) -> list[tuple]:
        with Store(tmp_path / f"{name}.db") as store:
            simulate_into_store(store, model, model, tokenizer, version="v", batch=5, **common)
            return store.db.execute(
                "SELECT c.external_id, m.role, m.text, m.generation FROM messages m "
                "JOIN conversations c ON c.id = m.conversation_id ORDER BY c.id, m.id"
            ).fetchall()

    grouped = logged("grouped")
    monkeypatch.setattr(simulate, "GENERATE_GROUP", 1)
    one_by_one = logged("one_by_one")
    assert one_by_one == grouped
    assert sum(role == "bot" for _, role, _, _ in grouped) >= 5
    assert len({text for _, role, text, _ in grouped if role == "bot"}) > 3  # drawn, not one

    # the same play unkeyed: its draws depend on the batching
    unkeyed = self_play(model, model, tokenizer, split="train", **common)
    monkeypatch.setattr(simulate, "GENERATE_GROUP", 64)
    unkeyed_grouped = self_play(model, model, tokenizer, split="train", **common)
    assert [g.bot_turns for g in unkeyed] != [g.bot_turns for g in unkeyed_grouped]


def test_every_interval_holds_its_own_point_estimate_even_for_distinct_n():
    """30 conversations of distinct replies: resampling conversations with replacement
    would duplicate replies and put distinct-2 and the repeat rate below their own point
    values; the intervals used hold every point."""
    from learner.evaluation import intervals

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(300)]
    measures = []
    for c in range(30):
        replies = [" ".join(rng.sample(vocabulary, 6)) + f" c{c}r{k}" for k in range(3)]
        measures.append(
            {
                "replies": replies,
                "signals": {n: [rng.random() for _ in replies] for n in COLUMNS},
                "combined": [rng.gauss(0, 1) for _ in replies],
                "perplexity": [rng.uniform(3, 30) for _ in replies],
                "kl_to_prior": rng.uniform(0, 0.2),
                "conversation_turns": 3,
            }
        )
    table = intervals(measures, seed=0)
    assert table["distinct_2"]["value"] > 0.95 and table["repeated_replies"]["value"] == 0.0
    for column, cell in table.items():
        assert cell["low"] <= cell["value"] <= cell["high"], (column, cell)
    # the old scheme, for the record: a bootstrap of distinct-2 misses its point
    from learner.evaluation import bootstrap, columns_of

    low, high = bootstrap(measures, lambda ms: columns_of(ms)["distinct_2"], 0, 200)
    assert high < table["distinct_2"]["value"]
    # one pass over the resamples gives each column the interval it gets on its own
    from learner.evaluation import SET_COLUMNS, jackknife

    for column in ("combined", "perplexity", "kl_to_prior", "bot_question", "reply_words"):
        alone = bootstrap(measures, lambda ms, c=column: columns_of(ms)[c], 0, 200)
        assert (table[column]["low"], table[column]["high"]) == alone, column
    for column in SET_COLUMNS:
        alone = jackknife(measures, lambda ms, c=column: columns_of(ms)[c])
        assert (table[column]["low"], table[column]["high"]) == pytest.approx(alone), column


def test_replies_generated_in_length_groups_come_back_in_input_order(tiny_model_dir):
    """generate_batch sorts the prompts by length into groups (a padded batch pays for
    its longest prompt in every row); each reply and cut flag still belongs to its own
    prompt: greedy replies in groups of 2 equal each prompt generated alone."""
    from learner.simulate import generate_batch

    model, tokenizer = load_model(tiny_model_dir)
    texts = ["a long opener " * 12, "hi", "what do you think of the weather " * 3, "ok"]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    greedy = Settings(temperature=0.0, top_p=1.0, max_new_tokens=5, repetition_penalty=1.0)
    cut: list[bool] = []
    grouped = generate_batch(model, tokenizer, prompts, greedy, cut, group=2)
    alone = [generate_batch(model, tokenizer, [p], greedy, group=1)[0] for p in prompts]
    assert grouped == alone
    assert len(set(alone)) > 1  # the prompts give different replies: order is tested
    assert cut == [True] * 4  # the untrained tiny model never ends a reply itself


def test_best_of_n_copies_read_each_prompt_once_and_sample_what_repeated_prompts_do(
    tiny_model_dir,
):
    """Best-of-N's candidates in self-play: each prompt is read once and its cache
    repeated for its copies; the replies are the ones the prompt repeated N times gives,
    greedy token for token, and sampled with the same seed."""
    from learner.simulate import generate_batch

    model, tokenizer = load_model(tiny_model_dir)
    texts = ["a long opener " * 12, "hi there", "what do you think of the weather " * 3]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    repeated = [p for p in prompts for _ in range(3)]
    rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[0])
    )
    greedy = Settings(temperature=0.0, top_p=1.0, max_new_tokens=5, repetition_penalty=1.0)
    for group in (3, 64):  # one prompt a group, and all in one
        rows.clear()
        cut: list[bool] = []
        copies = generate_batch(model, tokenizer, prompts, greedy, cut, group=group, copies=3)
        assert rows[0] == min(len(prompts), group // 3)  # the prefill: one row a prompt
        assert copies == generate_batch(model, tokenizer, repeated, greedy, group=group)
        assert len(cut) == 9
    hook.remove()
    sampled = Settings(temperature=1.0, top_p=0.9, max_new_tokens=8, repetition_penalty=1.2)
    torch.manual_seed(3)
    many = generate_batch(model, tokenizer, prompts, sampled, copies=3)
    torch.manual_seed(3)
    assert many == generate_batch(model, tokenizer, repeated, sampled)
    assert len(set(many)) > 3  # the copies of a prompt differ: they are samples


def test_best_of_n_in_self_play_sends_each_turns_top_ranked_reply_and_bounds_its_kl(
    tiny_model_dir,
):
    """The 'prior + best-of-N' row: every bot turn is the best of N samples of the same
    prompt by the ranking, and its KL column is the bound log N - (N-1)/N per reply
    spread over the reply's tokens (best-of-N has no per-token policy to measure)."""
    from learner.evaluation import evaluate
    from learner.simulate import Rerank

    model, tokenizer = load_model(tiny_model_dir)
    calls = []

    def longest(user, replies):
        calls.append((user, list(replies)))
        return [(float(len(r)), 0.0) for r in replies]

    settings = Settings(temperature=1.0, top_p=1.0, max_new_tokens=6, repetition_penalty=1.0)
    rerank = Rerank(4, longest)
    results = evaluate(
        {"plain": (model, tokenizer), "best": (model, tokenizer)},
        model,
        model,
        tokenizer,
        n=3,
        turns=2,
        seed=3,
        system_prompt="s",
        settings=settings,
        weights={},
        rerank={"best": rerank},
    )
    assert len(calls) >= 3 and all(len(replies) <= 4 for _, replies in calls)
    bots = [[t["text"] for t in game if t["role"] == "bot"] for game in results["samples"]["best"]]
    # turn by turn across the games (as self-play batches them), each bot turn is the
    # longest of the candidates ranked for it
    chosen = [bots[g][k] for k in range(2) for g in range(3) if len(bots[g]) > k]
    assert chosen == [max(replies, key=len) for _, replies in calls]
    assert results["plain"]["kl_to_prior"]["value"] == 0.0  # the prior itself
    bound = math.log(4) - 3 / 4
    kl = results["best"]["kl_to_prior"]["value"]
    assert 0 < kl < bound  # the per-reply bound over several tokens a reply
    assert rerank.kl_bound() == pytest.approx(bound)


def test_a_plain_rows_one_reply_games_are_its_best_of_n_games_first_candidates(
    tiny_model_dir, monkeypatch
):
    """The prior's row beside 'prior + best-of-N' (one unanswered reply per opener): its
    replies are the first of the N candidates each best-of-N reply was chosen from, not a
    self-play of their own; with answered or longer games each row plays its own."""
    import learner.evaluation as evaluation
    from learner.simulate import Player, Rerank

    model, tokenizer = load_model(tiny_model_dir)
    played, players = [], []
    real = evaluation.self_play_many

    def recording(bots, *args, **kwargs):
        games = real(bots, *args, **kwargs)
        players.append(list(bots))
        played.extend(games.values())
        return games

    monkeypatch.setattr(evaluation, "self_play_many", recording)
    settings = Settings(temperature=1.0, top_p=1.0, max_new_tokens=6, repetition_penalty=1.0)
    rerank = {"best": Rerank(3, lambda user, replies: [(float(len(r)), 0.0) for r in replies])}
    common = dict(n=4, seed=5, system_prompt="s", settings=settings, weights={}, rerank=rerank)
    models = {"plain": (model, tokenizer), "best": (model, tokenizer)}
    results = evaluation.evaluate(
        models,
        model,
        model,
        tokenizer,
        turns=1,
        answer_last=False,
        reference="plain",
        versus={"best": "plain", "plain": "nobody"},
        **common,
    )
    assert players == [["best"]]  # best-of-N's games only
    best = played[0]
    assert all(len(g.candidates[1]) == 3 for g in best)
    assert all(
        g.turns[1].text in [t for t, _ in g.candidates[1]] or g.turns[1].text == "…" for g in best
    )
    plain = [[t["text"] for t in game] for game in results["samples"]["plain"]]
    assert plain == [[g.opener, g.candidates[1][0][0]] for g in best[:3]]
    assert list(results)[1:] == ["plain", "best"]  # the rows in the order asked
    assert results["plain"]["kl_to_prior"]["value"] == 0.0
    assert results["plain"]["perplexity_ratio"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    zero = {"value": 0.0, "low": 0.0, "high": 0.0}
    assert all(d == zero for d in results["plain"]["difference"].values())
    asked = results["best"]["difference"]["bot_question"]
    assert asked["value"] == pytest.approx(
        results["best"]["bot_question"]["value"] - results["plain"]["bot_question"]["value"]
    )
    assert asked["low"] <= asked["value"] <= asked["high"]
    # head to head with another row: here the reference itself, so the same interval
    assert results["best"]["versus"] == {
        "row": "plain",
        "difference": results["best"]["difference"],
    }
    assert "versus" not in results["plain"]  # a peer that is not a row: no column
    ratio = results["best"]["perplexity_ratio"]["value"]
    assert ratio == pytest.approx(
        results["best"]["perplexity"]["value"] / results["plain"]["perplexity"]["value"]
    )

    # paired play: the first candidates are exactly the replies the plain model plays
    solo = real(
        {"plain": Player(model)},
        model,
        tokenizer,
        n=4,
        turns=1,
        seed=5,
        system_prompt="s",
        settings=settings,
        answer_last=False,
        paired=True,
    )["plain"]
    assert plain == [[g.opener, g.turns[1].text] for g in solo[:3]]

    players.clear()
    evaluation.evaluate(models, model, model, tokenizer, turns=1, answer_last=True, **common)
    assert players == [["plain", "best"]]  # the users answer the chosen reply: each plays


def test_eval_best_of_without_a_reward_model_is_one_line(rapport_home, tiny_model_dir):
    result = run_rapport("eval", str(tiny_model_dir), "--best-of", "4", "--n", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --best-of ranks replies with a reward model: train one first "
        "(`rapport reward-model train`)"
    )


def test_models_compared_play_in_lock_step_their_users_answering_in_one_batch_a_round(
    tiny_model_dir, monkeypatch
):
    """`rapport eval` plays its models in lock-step: each round one batched generation of
    the simulated users answers every model's conversations; each model's first replies
    are exactly those it gives playing alone (its own random stream, seeded alike), and
    its conversations are whole (same openers and personas, alternating turns)."""
    import copy

    import learner.simulate as simulate

    base, tokenizer = load_model(tiny_model_dir)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(3.0)  # another policy: other replies
    users = copy.deepcopy(base)
    calls = []
    real = simulate.generate_batch

    def counting(model, tok, prompts, *args, **kwargs):
        calls.append(("user" if model is users else "bot", len(prompts)))
        return real(model, tok, prompts, *args, **kwargs)

    monkeypatch.setattr(simulate, "generate_batch", counting)
    settings = Settings(temperature=1.0, top_p=1.0, max_new_tokens=5, repetition_penalty=1.0)
    common = dict(n=4, turns=2, seed=11, system_prompt="s", settings=settings)
    units = []
    games = simulate.self_play_many(
        {"base": simulate.Player(base), "other": simulate.Player(other)},
        users,
        tokenizer,
        progress=units.append,
        **common,
    )
    assert sum(units) == 2 * 2  # a unit per model and round
    user_calls = [rows for who, rows in calls if who == "user"]
    second = sum(1 for m in games for g in games[m] if len(g.turns) > 3)  # still talking
    assert user_calls == [8, second] if second else [8]  # both models' users, in one batch
    for name, model in (("base", base), ("other", other)):
        alone = self_play(model, users, tokenizer, **common)
        assert [(g.opener, g.persona) for g in games[name]] == [
            (g.opener, g.persona) for g in alone
        ]
        assert [g.turns[1].text for g in games[name]] == [g.turns[1].text for g in alone]
        for game in games[name]:
            roles = [t.role for t in game.turns]
            assert roles == ["user", "bot", "user", "bot", "user"][: len(roles)]
            assert len(roles) >= 3  # every first reply answered
    assert [g.turns[1].text for g in games["base"]] != [g.turns[1].text for g in games["other"]]


def test_paired_play_draws_each_conversation_by_its_key_whatever_plays_beside_it(
    tiny_model_dir,
):
    """`rapport eval` plays paired (common random numbers): a model's conversations,
    its simulated users' lines included, are the same whether it plays alone or beside
    another model (other batches, other rows); a copy of a model plays exactly its
    conversations, where unpaired play gives the copy's users other draws; and each
    conversation's draws are its own (the replies of a model to six openers are not one
    draw repeated)."""
    import copy

    from learner.simulate import Player, self_play_many

    base, tokenizer = load_model(tiny_model_dir)
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(3.0)
    users = copy.deepcopy(base)
    settings = Settings(temperature=1.0, top_p=0.9, max_new_tokens=6, repetition_penalty=1.0)
    common = dict(n=6, turns=2, seed=11, system_prompt="s", settings=settings)

    def texts(games):
        return [[t.text for t in g.turns] for g in games]

    alone = self_play_many({"base": Player(base)}, users, tokenizer, paired=True, **common)
    beside = self_play_many(
        {"other": Player(other), "base": Player(base)}, users, tokenizer, paired=True, **common
    )
    assert texts(beside["base"]) == texts(alone["base"])
    assert texts(beside["other"]) != texts(alone["base"])
    assert all(len(g.turns) >= 3 for g in alone["base"])  # the users' lines compared too

    twins = {"base": Player(base), "copy": Player(copy.deepcopy(base))}
    paired = self_play_many(twins, users, tokenizer, paired=True, **common)
    assert texts(paired["copy"]) == texts(paired["base"]) == texts(alone["base"])
    unpaired = self_play_many(twins, users, tokenizer, **common)
    assert texts(unpaired["copy"]) != texts(unpaired["base"])
    replies = [g.turns[1].text for g in alone["base"]]
    assert len(set(replies)) > 3


def test_a_paired_perplexity_ratio_cancels_what_the_openers_share():
    """Two models on the same openers, where the opener sets most of a reply's
    perplexity: the ratio's paired interval holds its point and is far narrower than
    the two models' own intervals would allow; a model against itself is exactly 1."""
    from learner.evaluation import bootstrap, paired_ratio

    rng = random.Random(3)
    hardness = [rng.lognormvariate(1.5, 0.6) for _ in range(200)]
    ours = [[h * 1.2 * rng.uniform(0.95, 1.05)] for h in hardness]
    theirs = [[h * rng.uniform(0.95, 1.05)] for h in hardness]
    paired = paired_ratio(ours, theirs, seed=0)
    assert paired["low"] <= paired["value"] <= paired["high"]
    assert paired["value"] == pytest.approx(
        sum(x for c in ours for x in c) / sum(x for c in theirs for x in c)
    )
    assert 1.15 < paired["low"] and paired["high"] < 1.25  # the true ratio, 1.2, tightly

    def mean(sample):
        return sum(x for c in sample for x in c) / len(sample)

    low_ours, high_ours = bootstrap(ours, mean, seed=0)
    low_theirs, high_theirs = bootstrap(theirs, mean, seed=1)
    unpaired_span = high_ours / low_theirs - low_ours / high_theirs
    assert paired["high"] - paired["low"] < unpaired_span / 5
    assert paired_ratio(ours, ours, seed=0) == {"value": 1.0, "low": 1.0, "high": 1.0}
    with pytest.raises(ValueError):
        paired_ratio(ours, theirs[:-1], seed=0)


def test_a_paired_difference_of_question_rates_sees_a_gain_two_intervals_would_not():
    """Paired sampling makes two models' replies alike where the models agree: here a
    model asks in the same 45% of conversations as the reference and in 8% more. The
    paired difference is the difference of the pooled means exactly, its interval holds
    it and excludes 0, while the two rows' own intervals overlap; a model against itself
    is 0 [0, 0]; values that are not finite (a reply with no score) are skipped."""
    from learner.evaluation import bootstrap, paired_difference

    rng = random.Random(5)
    theirs = [[1.0 if rng.random() < 0.45 else 0.0] for _ in range(200)]
    ours = [[1.0] if t == [0.0] and rng.random() < 0.15 else list(t) for t in theirs]
    ours[0].append(float("nan"))
    diff = paired_difference(ours, theirs, seed=0)
    rate = [sum(c[0] for c in side) / 200 for side in (ours, theirs)]
    assert diff["value"] == pytest.approx(rate[0] - rate[1]) and diff["value"] > 0.04
    assert 0 < diff["low"] <= diff["value"] <= diff["high"]

    def mean(sample):
        return sum(c[0] for c in sample) / len(sample)

    low_ours, _ = bootstrap(ours, mean, seed=0)
    _, high_theirs = bootstrap(theirs, mean, seed=1)
    assert low_ours < high_theirs  # side by side, the two intervals overlap
    assert paired_difference(theirs, theirs, seed=0) == {"value": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError):
        paired_difference(ours, theirs[:-1], seed=0)
