"""Best-of-N: N replies sampled together, ranked by the learned reward, the best sent,
all N logged with their scores; a plain reply when there is no reward model."""

from __future__ import annotations

import pytest

from bot.config import Config
from bot.loop.cli import best_of_ranker
from bot.policy import Candidate, Policy, clean_reply
from bot.session import Session


def tiny_policy(tiny_model_dir, *, best_of=1, ranker=None, temperature=0.7, caution=1.0):
    config = Config()
    config.model.path = str(tiny_model_dir)
    config.model.context_tokens = 256
    config.generation.max_new_tokens = 8
    config.generation.temperature = temperature
    config.generation.best_of = best_of
    config.generation.best_of_caution = caution
    return Policy.load(config.model, config.generation, seed=0, ranker=ranker)


class Stub:
    """A ranking with fixed scores by candidate position; records what it was shown."""

    version = "stub-1"

    def __init__(self, scores):
        self.scores, self.calls = scores, []

    def __call__(self, user, replies):
        self.calls.append((user, list(replies)))
        return self.scores[: len(replies)]


def test_sampled_candidates_are_replies_the_bot_could_send(tiny_model_dir):
    greedy = tiny_policy(tiny_model_dir, temperature=0)
    from bot.prompt import Turn

    turns = [Turn("user", "hello there")]
    expected = greedy.reply(turns)
    candidates = greedy.sample_replies(turns, 3)
    # greedy: every row of the batch is the one-at-a-time reply, token for token
    assert [c.text for c in candidates] == [expected] * 3
    # the untrained tiny model never ends a turn: the 8-token limit cut each one
    assert all(c.cut for c in candidates)
    sampled = tiny_policy(tiny_model_dir).sample_replies(turns, 4)
    assert len({c.text for c in sampled}) > 1  # sampled rows differ


def test_the_best_scored_candidate_is_sent_and_every_candidate_is_logged(store, tiny_model_dir):
    ranker = Stub([(0.1, 0.0), (0.9, 0.0), (0.5, 0.0), (0.3, 0.0)])
    policy = tiny_policy(tiny_model_dir, best_of=4, ranker=ranker)
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    shown = []
    reply = session.respond("what do you like?", on_text=shown.append)
    user, candidates = ranker.calls[0]
    assert user == "what do you like?" and len(candidates) == 4
    assert reply.text == candidates[1] and shown == [candidates[1]]
    bot = store.messages(session.conversation_id)[-1]
    assert bot.text == candidates[1] and bot.model_version == policy.version
    record = bot.generation["best_of"]
    assert record["n"] == 4 and record["chosen"] == 1 and record["ranker"] == "stub-1"
    assert [c["text"] for c in record["candidates"]] == candidates
    assert [c["mean"] for c in record["candidates"]] == [0.1, 0.9, 0.5, 0.3]
    assert bot.generation["cut"] is True  # the chosen candidate was cut, and says so


@pytest.mark.parametrize("caution,chosen", [(1.0, 1), (0.0, 0)])
def test_a_candidate_the_ensemble_disagrees_on_loses_to_a_sure_one(
    store, tiny_model_dir, caution, chosen
):
    ranker = Stub([(2.0, 1.9), (1.0, 0.0), (-1.0, 0.0)])  # a lucky 2.0 with a wide spread
    policy = tiny_policy(tiny_model_dir, best_of=3, ranker=ranker, caution=caution)
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    reply = session.respond("hi")
    assert reply.text == ranker.calls[0][1][chosen]


class Fixed:
    """A policy whose N candidates are given (template debris is cleaned away first, as
    :meth:`Policy.sample_replies` does)."""

    version, best_of, caution = "fixed", 3, 1.0

    def __init__(self, texts, ranker, settings):
        self.texts, self.ranker, self.settings = texts, ranker, settings

    def sample_replies(self, turns, n):
        return [Candidate(clean_reply(t), False) for t in self.texts]


def test_an_empty_or_debris_only_candidate_is_never_chosen_nor_ranked(store, tiny_model_dir):
    settings = tiny_policy(tiny_model_dir).settings
    ranker = Stub([(-5.0, 0.0)])
    policy = Fixed(["<|im_end|>", "", "fine, thanks"], ranker, settings)
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    assert session.respond("how are you?").text == "fine, thanks"
    assert ranker.calls == [("how are you?", ["fine, thanks"])]
    nothing = Fixed(["<|im_start|>assistant", "  "], Stub([]), settings)
    session.policy_source = lambda: nothing
    assert session.respond("and now?").text == "…"  # a bot turn is never empty
    assert store.messages(session.conversation_id)[-1].generation["best_of"]["chosen"] is None


def test_without_a_reward_model_one_line_says_so_and_replies_are_plain(
    store, tiny_model_dir, capsys
):
    config = Config()
    config.generation.best_of = 4
    assert best_of_ranker(config) is None
    err = capsys.readouterr().err
    assert err.strip() == (
        "generation.best_of is 4, but no reward model is trained yet (`rapport reward-model "
        "train`): replying with one sample"
    )
    config.generation.best_of = 1
    assert best_of_ranker(config) is None and capsys.readouterr().err == ""  # off: silent
    policy = tiny_policy(tiny_model_dir, best_of=4, ranker=None)
    assert policy.best_of == 1
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    session.respond("hello")
    assert "best_of" not in store.messages(session.conversation_id)[-1].generation


def test_the_terminal_spins_while_the_candidates_are_generated_then_shows_the_chosen_one(
    store, tiny_model_dir
):
    import io
    import time

    from bot.terminal import Terminal

    class Slow(Fixed):
        def sample_replies(self, turns, n):
            time.sleep(0.5)
            return super().sample_replies(turns, n)

    policy = Slow(["meh", "fine, thanks"], Stub([(0.0, 0.0), (1.0, 0.0)]), None)
    policy.settings = tiny_policy(tiny_model_dir).settings
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    out = io.StringIO()
    Terminal(session, out, interactive=True, read_line=input).chat("how are you?")
    shown = out.getvalue()
    assert "⠋" in shown and "⠙" in shown  # it spun while nothing was chosen
    # then the spinner was rubbed out and the chosen reply printed once
    assert shown.count("fine, thanks") == 1 and "meh" not in shown
    assert shown.index("fine, thanks") > shown.rindex("⠋")
