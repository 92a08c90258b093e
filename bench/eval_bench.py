"""Wall time of `rapport eval`-style self-play and metrics with the default model on CPU.

Rows: the same evaluation (the default model as both the bot and the simulated user,
six bot turns per conversation, metrics and bootstrap intervals included) for n and 4n
conversations, and the ratio: batched generation makes 4x the conversations cost well
under 4x the time. Goal (issue 6): <= 10 minutes for 50 conversations on this machine.

Run: ``.venv/bin/python bench/eval_bench.py [--small 12 --large 48 --turns 6]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(n: int, turns: int) -> float:
    from bot.config import Config
    from bot.policy import Settings, default_model_dir, load_model, prepare_for_serving
    from learner.evaluation import evaluate

    config = Config()
    served, tokenizer = load_model(default_model_dir())
    served = prepare_for_serving(served, "bf16")  # as `rapport eval` serves for batches
    prior = served  # and scores fluency and KL with the prior in the same precision
    start = time.perf_counter()
    evaluate(
        {"prior": (served, tokenizer)},
        prior,
        served,
        tokenizer,
        n=n,
        turns=turns,
        seed=0,
        system_prompt=config.model.system_prompt,
        settings=Settings.from_config(config.generation),
        weights=dataclasses.asdict(config.weights),
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=12)
    parser.add_argument("--large", type=int, default=48)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    import os

    small = run(args.small, args.turns)
    large = run(args.large, args.turns)
    print(f"default model (bf16) as bot and simulated user, {args.turns} bot turns")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min) at the end: {load}")
    print(f"{'conversations':>14} {'seconds':>9} {'s/conversation':>15}")
    for n, seconds in ((args.small, small), (args.large, large)):
        print(f"{n:>14} {seconds:>9.1f} {seconds / n:>15.2f}")
    print(
        f"\n{args.large / args.small:.2f}x the conversations cost {large / small:.2f}x the time; "
        f"50 conversations ~ {large / args.large * 50 / 60:.1f} min (goal <= 10)"
    )


if __name__ == "__main__":
    main()
