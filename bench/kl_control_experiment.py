"""The paper's exploit case on the real model: learn from the bot_question reward alone.

Jaques et al. 2019 show that batch Q-learning without a prior learns to exploit such a
reward and drifts from natural language, while KL-control (Q-learning with the log prior,
Psi-learning) stays close to the prior. This reproduces the comparison with
SmolLM2-135M-Instruct as the prior, the first N chitchat conversations as the logs, and
``bot_question`` as the only reward, for ``batch_q``, ``kl_q`` and ``psi``.

For each model (and the prior), one sampled reply (seeded) to each held-out first user
turn of chitchat conversations that were not trained on: question rate, KL(π‖prior) per
token along the reply, distinct-2 over all replies, and the replies' perplexity under the
prior. Prints the table and sample replies; writes them as JSON beside this file.

Run: ``.venv/bin/python bench/kl_control_experiment.py [--conversations 300 --steps 40]``
(about 20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args()
    os.environ["RAPPORT_HOME"] = tempfile.mkdtemp(prefix="rapport-experiment-")

    import torch

    from bot.config import Config
    from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations
    from bot.policy import DEFAULT_MODEL_NAME, Policy, default_model_dir, load_model
    from bot.prompt import Turn
    from bot.store import Store
    from learner.config import TrainConfig
    from learner.evaluate import distinct_n, kl_per_token, perplexity
    from learner.pipeline import run_training
    from rewards.bot_question import asks
    from rewards.score import score_store
    from rewards.text import words

    conversations = list(islice(chitchat_conversations(), args.conversations + args.held_out))
    store = Store(Path(os.environ["RAPPORT_HOME"]) / "rapport.db")
    store.import_conversations(CHITCHAT_PLATFORM, conversations[: args.conversations])
    score_store(store, Config())
    prompts = [c.turns[0][2] for c in conversations[args.conversations :]]

    prior_path = default_model_dir()
    prior, _ = load_model(prior_path)
    models = {"prior": prior_path}
    for algo in ("batch_q", "kl_q", "psi"):
        config = TrainConfig(
            algo=algo,
            reward="bot_question",
            steps=args.steps,
            lr=args.lr,
            batch_size=4,
            max_tokens=128,
            reward_scale=0.5,
            checkpoint_every=10_000,
        )

        def progress(step, metrics, algo=algo):
            print(f"{algo} step {step} loss {metrics['loss']:.4f}", file=sys.stderr)

        version, folder, _ = run_training(
            store,
            prior_path,
            DEFAULT_MODEL_NAME,
            Config().model.system_prompt,
            config,
            progress=progress,
        )
        models[algo] = folder

    rows, samples = {}, {}
    for name, folder in models.items():
        config = Config()
        config.model.path = str(folder)
        config.model.serve_precision = "fp32"
        config.generation.max_new_tokens = 40
        questions, kls, ppls, replies = 0, [], [], []
        for i, prompt in enumerate(prompts):
            policy = Policy.load(config.model, config.generation, seed=i)
            prompt_ids = policy.prompt_ids([Turn("user", prompt)])
            reply_ids = list(policy.stream_tokens(prompt_ids))
            text = policy.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
            replies.append(text)
            questions += asks(text)
            kls.append(kl_per_token(policy.model, prior, prompt_ids, reply_ids))
            ppls.append(perplexity(prior, prompt_ids, reply_ids))
        finite = [p for p in ppls if math.isfinite(p)]
        rows[name] = {
            "question_rate": questions / len(prompts),
            "kl_to_prior": sum(kls) / len(kls),
            "distinct_2": distinct_n([words(r) for r in replies], 2),
            "perplexity_under_prior": sorted(finite)[len(finite) // 2] if finite else math.nan,
        }
        samples[name] = [
            {"user": p, "bot": r} for p, r in zip(prompts[:3], replies[:3], strict=True)
        ]
        torch.manual_seed(0)

    print(
        f"{args.conversations} chitchat conversations, reward = bot_question, "
        f"{args.steps} steps, {len(prompts)} held-out prompts"
    )
    header = f"{'question rate':>14} {'KL/token':>9} {'distinct-2':>11} {'ppl (prior)':>12}"
    print(f"{'model':<10} {header}")
    for name, r in rows.items():
        print(
            f"{name:<10} {r['question_rate']:>14.2f} {r['kl_to_prior']:>9.3f} "
            f"{r['distinct_2']:>11.3f} {r['perplexity_under_prior']:>12.2f}"
        )
    for name, pairs in samples.items():
        print(f"\n[{name}]")
        for pair in pairs:
            print(f"  user: {pair['user']!r}\n  bot:  {pair['bot']!r}")
    out = Path(__file__).with_name("kl_control_experiment.json")
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
