"""Learner step cost: a psi step with M = 5 beside a trl KTOTrainer step, same model,
batch and precision, in the same run.

Rows (SmolLM2-135M fp32 on CPU, batch 4 x 128 tokens):

- ``rapport psi, M = 5``: one optimiser step of ``learner.train`` (online forward and
  backward, a no-grad target forward, 5 Monte-Carlo dropout samples on the target's last
  hidden state in one batched output-layer pass, cached prior log-probs);
- ``rapport psi, M = 1``: the same without Monte-Carlo dropout;
- ``trl KTOTrainer (peer)``: one step of trl's KTO on the same 4 x 128-token examples
  (policy forward and backward, reference forward, KL estimate).

Each row runs in its own process, so its peak memory (max RSS) is its own.
Goal (issue 5): psi with M = 5 <= 1.25x a KTO step, peak memory <= 1.5x KTO's.

Run: ``.venv/bin/python bench/learner_bench.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH, TOKENS = 4, 128


def windows(tokenizer):
    """4 windows of exactly 128 tokens: a chat turn, then a long bot reply."""
    from bot.prompt import Turn, encode_chat
    from learner.data import TERMINAL, Window

    out = []
    for i in range(BATCH):
        prompt = encode_chat(tokenizer, "", [Turn("user", f"Tell me a story number {i}.")])
        reply = tokenizer(" once upon a time" * 60, add_special_tokens=False)["input_ids"]
        ids = (prompt + reply)[:TOKENS]
        n = len(ids)
        mask = [len(prompt) - 1 <= t < n - 1 for t in range(n)]
        reward = [0.0] * n
        reward[n - 2] = 1.0
        next_pos = [t + 1 if t < n - 2 else TERMINAL for t in range(n)]
        out.append(Window(ids, mask, reward, next_pos, [1.0] * n, i, [-2.0] * n, [10.0] * n))
    return out, prompt, reply


def run_psi(samples: int, steps: int) -> dict:
    from bot.policy import default_model_dir, load_model
    from learner.config import TrainConfig
    from learner.data import Dataset
    from learner.train import prepare_models, train

    _, tokenizer = load_model(default_model_dir())
    batch, _, _ = windows(tokenizer)
    config = TrainConfig(
        algo="psi",
        steps=steps + 1,
        batch_size=BATCH,
        mc_samples=samples,
        checkpoint_every=10_000,
        log_every=10_000,
    )
    models = prepare_models(default_model_dir(), config)
    times = []

    def progress(step, metrics):
        times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(config, Dataset(batch, [], {}), models, Path(tmp), pad_id=0, progress=progress)
    steps_s = [b - a for a, b in zip([start] + times, times, strict=False)][1:]  # skip warm-up
    return {"step_s": sorted(steps_s)[len(steps_s) // 2]}


def run_kto(steps: int) -> dict:
    import datasets
    from trl import KTOConfig, KTOTrainer

    from bot.policy import default_model_dir, load_model

    model, tokenizer = load_model(default_model_dir())
    model.train()
    _, prompt, reply = windows(tokenizer)
    prompt_text = tokenizer.decode(prompt)
    reply_text = tokenizer.decode(reply[: TOKENS - len(prompt)])
    data = datasets.Dataset.from_list(
        [
            {"prompt": prompt_text, "completion": reply_text, "label": i % 2 == 0}
            for i in range(BATCH * (steps + 1))
        ]
    )
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = KTOConfig(
            output_dir=tmp,
            per_device_train_batch_size=BATCH,
            max_steps=steps + 1,
            max_length=TOKENS,
            learning_rate=1e-5,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            dataloader_num_workers=0,
            desirable_weight=1.0,
            undesirable_weight=1.0,
        )
        trainer = KTOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        start = time.perf_counter()
        trainer.train()
    steps_s = [b - a for a, b in zip([start] + times, times, strict=False)][1:]
    return {"step_s": sorted(steps_s)[len(steps_s) // 2]}


def child(which: str, steps: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_kto(steps) if which == "kto" else run_psi(int(which), steps)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps)
        return
    rows = {}
    for name, which in [
        ("rapport psi, M = 5", "5"),
        ("rapport psi, M = 1", "1"),
        ("trl KTOTrainer (peer)", "kto"),
    ]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", which, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        rows[name] = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    kto = rows["trl KTOTrainer (peer)"]
    print(f"SmolLM2-135M fp32, CPU, batch {BATCH} x {TOKENS} tokens, median of {args.steps} steps")
    print(f"{'learner':<26} {'s/step':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'vs KTO':>12}")
    for name, r in rows.items():
        ratio = f"{r['step_s'] / kto['step_s']:.2f}x / {r['max_rss_mb'] / kto['max_rss_mb']:.2f}x"
        print(
            f"{name:<26} {r['step_s']:>8.2f} {BATCH * TOKENS / r['step_s']:>9.0f} "
            f"{r['max_rss_mb']:>12.0f} {ratio:>12}"
        )
    psi = rows["rapport psi, M = 5"]
    print(
        f"\npsi M=5 / KTO: time {psi['step_s'] / kto['step_s']:.2f}x (goal <= 1.25x), "
        f"peak memory {psi['max_rss_mb'] / kto['max_rss_mb']:.2f}x (goal <= 1.5x)"
    )


if __name__ == "__main__":
    main()
