"""Implicit vs explicit feedback: psi on implicit rewards, psi on votes, trl's KTO on votes.

The seed's central claim (Jaques et al. 2019) is that learning from implicit signals
beats learning from explicit votes, which people rarely give. This bench tests it on a
simulated log where one hidden preference produces both kinds of feedback:

- The log: the first N chitchat conversations (real human chit-chat; the "bot" side is
  human-written). A hidden simulated person enjoys a bot turn that engages them (it
  says "you"/"your") with probability 0.85, and one that does not with probability 0.15.
- Implicit reactions on every bot turn: an enjoyed turn gets the user's reply with a
  laugh in front ("haha ..."); one not enjoyed gets a curt reply ("ok. " and the reply's
  first five words).
- Explicit votes on a share of the bot turns (``--vote-rate``, default 20%: votes are
  sparse): 👍 if enjoyed, 👎 if not.
- ``rapport score`` with the ``manual_vote`` weight set to 0, so ``combined`` is implicit
  only; then three learners from the same prior (SmolLM2-135M-Instruct): ``psi`` on
  ``combined``, ``psi`` on ``manual_vote`` (0 on unvoted turns), ``kto`` on the votes.
- Evaluation: ``learner.evaluation.evaluate`` (what ``rapport eval`` runs: self-play
  with simulated users, the prior as the user) for the prior and the three models; plus
  ``hidden_pref``: the share of engaging replies (what the hidden person enjoys) among
  one sampled reply per held-out chitchat opener, with a bootstrap interval.

Run: ``.venv/bin/python bench/implicit_vs_explicit.py`` (defaults: 150 conversations,
30 steps per learner, eval n = 8 x 3 turns, 30 openers: about an hour on 2 shared CPU
cores, an estimated 30 minutes on 2 quiet ones; bench/RESULTS.md).
Step counts are small so it runs in minutes on a CPU; the numbers show the pipeline and
early trends, not converged learners.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PLATFORM = "simulated-preference"
ENGAGING = {"you", "your", "you're", "yours", "yourself"}
COLUMNS = (
    "hidden_pref",
    "combined",
    "user_laughter",
    "user_reply_length",
    "user_sentiment",
    "kl_to_prior",
    "perplexity",
    "distinct_2",
    "reply_words",
)


def engaging(text: str) -> bool:
    from rewards.text import words

    return bool(ENGAGING & {w.lower() for w in words(text)})


def react(user_reply: str, enjoyed: bool) -> str:
    """The simulated person's reply: a laugh when enjoyed, curt when not."""
    if enjoyed:
        return "haha " + user_reply
    return "ok. " + " ".join(user_reply.split()[:5])


def simulated_log(store, n: int, vote_rate: float, seed: int) -> dict:
    """Import n chitchat conversations with reactions from the hidden preference, then
    vote on a share of the bot turns. Returns counts."""
    from bot.corpora import chitchat_conversations

    rng = random.Random(seed)
    enjoyed: dict[tuple[str, int], bool] = {}
    speakers: dict[str, str] = {}
    imported = []
    for conversation in islice(chitchat_conversations(), n):
        turns = list(conversation.turns)
        for k, (role, _, text) in enumerate(turns):
            if role != "bot":
                continue
            liked = rng.random() < (0.85 if engaging(text) else 0.15)
            enjoyed[(conversation.external_id, k)] = liked
            if k + 1 < len(turns) and turns[k + 1][0] == "user":
                who, author, reply = turns[k + 1]
                turns[k + 1] = (who, author, react(reply, liked))
        imported.append(dataclasses.replace(conversation, turns=tuple(turns)))
        speakers[conversation.external_id] = conversation.speaker
    store.import_conversations(PLATFORM, imported)
    votes = 0
    for c in store.feedback_conversations(platform=PLATFORM):
        user = store.pseudonym("user", PLATFORM, speakers[c["external_id"]])
        for k, turn in enumerate(c["turns"]):
            if turn["role"] == "bot" and rng.random() < vote_rate:
                store.vote(turn["id"], user, 1 if enjoyed[(c["external_id"], k)] else -1)
                votes += 1
    return {"conversations": len(imported), "bot_turns": len(enjoyed), "votes": votes}


def hidden_pref(model, tokenizer, openers, settings, system_prompt, seed) -> dict:
    """Share of sampled first replies the hidden person is likely to enjoy, with a 95%
    bootstrap interval."""
    import torch

    from bot.prompt import Turn, build_prompt
    from learner.evaluation import bootstrap
    from learner.simulate import generate_batch

    torch.manual_seed(seed)
    prompts = [build_prompt(tokenizer, system_prompt, [Turn("user", o)], 1024) for o in openers]
    replies = generate_batch(model, tokenizer, prompts, settings)
    hits = [float(engaging(r)) for r in replies]
    low, high = bootstrap(hits, lambda xs: sum(xs) / len(xs), seed)
    return {"value": sum(hits) / len(hits), "low": low, "high": high, "replies": replies[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=150)
    parser.add_argument("--vote-rate", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=8, help="Self-play conversations per model.")
    parser.add_argument("--turns", type=int, default=3, help="Bot turns per conversation.")
    parser.add_argument("--openers", type=int, default=30, help="Held-out openers sampled.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()

    from bot.config import Config
    from bot.policy import Settings, default_model_dir, load_model, prepare_for_serving
    from learner.config import TrainConfig
    from learner.evaluation import evaluate, format_table
    from learner.pipeline import run_training
    from learner.simulate import held_out_openers
    from rewards.score import score_store

    prior_path = default_model_dir()  # the cached default model, before moving home
    os.environ["RAPPORT_HOME"] = tempfile.mkdtemp(prefix="rapport-implicit-vs-explicit-")
    from bot.store import Store

    config = Config()
    config.weights.manual_vote = 0.0  # combined = the implicit signals only
    weights = dataclasses.asdict(config.weights)
    system_prompt = config.model.system_prompt
    timings = {}
    start = time.perf_counter()
    store = Store(Path(os.environ["RAPPORT_HOME"]) / "rapport.db")
    counts = simulated_log(store, args.conversations, args.vote_rate, args.seed)
    score_store(store, config)
    timings["log and score"] = time.perf_counter() - start

    runs = {
        "psi (implicit)": TrainConfig(algo="psi", reward="combined", reward_scale=0.5, lr=3e-5),
        "psi (votes)": TrainConfig(algo="psi", reward="manual_vote", reward_scale=0.5, lr=3e-5),
        "kto (votes)": TrainConfig(algo="kto", lr=5e-6, platform=PLATFORM),
    }
    folders = {}
    for name, train_config in runs.items():
        train_config.steps, train_config.max_tokens, train_config.seed = args.steps, 128, args.seed
        start = time.perf_counter()
        _, folders[name], _ = run_training(store, prior_path, "prior", system_prompt, train_config)
        timings[name] = time.perf_counter() - start

    start = time.perf_counter()
    prior, tokenizer = load_model(prior_path)
    user, _ = load_model(prior_path)
    user = prepare_for_serving(user, "bf16")
    models = {"prior": (prepare_for_serving(load_model(prior_path)[0], "bf16"), tokenizer)}
    for name, folder in folders.items():
        models[name] = (prepare_for_serving(load_model(folder)[0], "bf16"), tokenizer)
    settings = Settings.from_config(config.generation)
    results = evaluate(
        models,
        prior,
        user,
        tokenizer,
        n=args.n,
        turns=args.turns,
        seed=args.seed,
        system_prompt=system_prompt,
        settings=settings,
        weights=weights,
    )
    openers = held_out_openers(args.openers, args.seed + 1)
    for name, (model, _) in models.items():
        results[name]["hidden_pref"] = hidden_pref(
            model, tokenizer, openers, settings, system_prompt, args.seed
        )
    timings["evaluate"] = time.perf_counter() - start

    print(f"log: {counts}; steps per learner: {args.steps}; eval n={args.n} x {args.turns}")
    print(format_table(results, COLUMNS))
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    for name in models:
        print(f"[{name}] replies: {results[name]['hidden_pref']['replies']}")
    results["meta"] = {"args": vars(args), "log": counts, "seconds": timings}
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
