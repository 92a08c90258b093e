"""Sharing the machine: the chat beside a training, the training beside an idle bot.

Three settings in the same run (issue 18, "Sharing the machine"):

- ``old defaults``: what every rapport process did before ``[processes]``: torch's thread
  per core, OpenMP threads that spin while they wait, batch work at the chat's priority
  (the settings that make ``bot.processes.apply`` do nothing);
- ``new settings``: the ``[processes]`` config (its defaults, or what ``RAPPORT_CONFIG``
  and ``RAPPORT_PROCESSES_*`` say): batch work at nice 19 with passive OpenMP waits;
- ``new, bot passive``: the same, and the bot's OpenMP threads wait passively too
  (``processes.serve_passive_wait``, off by default: this row says whether it should be).

For each, four measurements:

1. chat alone: time to first token and decode tokens/s of forced 40-token replies
   (``bench/chat_bench.py``'s row functions, the served int8 model), in a process that
   applies the serving settings as ``rapport chat`` does;
2. the same chat while a real ``rapport train --algo psi`` subprocess trains beside it;
3. the training's seconds per step beside the same chat process, loaded and idle;
4. the training alone (no bot).

Goal: the chat beside the training keeps >= 70% of its tokens/s alone, and the training
beside the idle bot keeps >= 70% of its step rate alone. The figures are medians; the
first training step (warm-up) is never counted.

Setup, once, in a temporary ``RAPPORT_HOME``: the first ``--conversations`` chitchat
conversations are imported and scored, and a one-step run prepares the training data
(the later runs reuse it).

Run (an idle machine; about 15 minutes at the defaults):
``.venv/bin/python bench/colocation_bench.py [--replies N] [--steps S]``.
A quick smoke run: ``--replies 2 --steps 2 --batch-size 1 --max-tokens 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --set flags that make bot.processes.apply a no-op: the processes as they were before
OLD_DEFAULTS = (
    "processes.batch_nice=0",
    "processes.batch_threads=0",
    "processes.serve_threads=0",
    "processes.batch_passive_wait=false",
    "processes.serve_passive_wait=false",
)
SETTINGS = {
    "old defaults": OLD_DEFAULTS,
    "new settings": (),
    "new, bot passive": ("processes.serve_passive_wait=true",),
}
GOAL = 0.70


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--replies", type=int, default=12, help="chat replies per measurement")
    add("--steps", type=int, default=6, help="training steps per measurement")
    add("--conversations", type=int, default=64, help="chitchat conversations to train on")
    add("--batch-size", type=int, default=4, help="rapport train --batch-size")
    add("--max-tokens", type=int, default=256, help="rapport train --max-tokens")
    add("--model", default="", help="model folder (default: SmolLM2-135M-Instruct)")
    add("--chat-worker", action="store_true", help=argparse.SUPPRESS)  # the chat process
    add("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def chat_worker(args) -> None:
    """The bot: applies the serving settings before torch loads, as ``rapport chat`` does,
    then answers each ``measure`` line on stdin with one JSON line of medians."""
    from bot import processes
    from bot.config import load_config

    config = load_config(overrides=args.overrides)
    processes.apply(config.processes.settings("serving"))
    # torch loads only now, after the settings (chat_bench imports it)
    from chat_bench import NEW_TOKENS, bench_prompts, bench_rapport, forced_policy, time_stream

    from bot.policy import default_model_dir, load_model, prepare_for_serving

    config.generation.max_new_tokens = NEW_TOKENS
    model, tokenizer = load_model(args.model or default_model_dir())
    model = prepare_for_serving(model, config.model.serve_precision)
    prompts = bench_prompts(forced_policy(model, tokenizer, config, seed=0), args.replies)
    time_stream(forced_policy(model, tokenizer, config, seed=0), prompts[0])  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        row = bench_rapport("chat", model, tokenizer, config, prompts)
        medians = {key: statistics.median(row[key]) for key in ("ttft", "rate")}
        print(json.dumps(medians), flush=True)


class Chat:
    """A chat worker process with one setting."""

    def __init__(self, args, overrides, env) -> None:
        sets = [f"--set={s}" for s in overrides]
        command = [sys.executable, __file__, "--chat-worker", "--replies", str(args.replies)]
        command += ["--model", args.model] if args.model else []
        self.process = subprocess.Popen(
            [*command, *sets], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit("the chat worker did not start (its error is above)")

    def measure(self) -> dict:
        self.process.stdin.write("measure\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class Training:
    """``rapport train --algo psi`` in a subprocess; a thread notes when each step's line
    reaches the run's metrics.jsonl. It trains until stopped (it never checkpoints)."""

    def __init__(self, args, overrides, env, home: Path, steps: int = 100_000) -> None:
        runs = home / "runs"
        before = set(runs.glob("*")) if runs.exists() else set()
        command = [sys.executable, "-m", "bot.loop.cli", *[f"--set={s}" for s in overrides]]
        command += ["train", "--algo", "psi", "--steps", str(steps)]
        command += ["--checkpoint-every", str(steps), "--log-every", str(steps)]
        command += ["--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens)]
        command += ["--model", args.model] if args.model else []
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.times: list[float] = []
        self._watch = threading.Thread(target=self._follow, args=(runs, before), daemon=True)
        self._watch.start()

    def _follow(self, runs: Path, before: set) -> None:
        log = None
        while self.process.poll() is None:
            if log is None:
                new = [r for r in runs.glob("*") if r not in before] if runs.exists() else []
                log = new[0] / "metrics.jsonl" if new else None
            elif log.exists():
                lines = log.read_text().count("\n")
                now = time.perf_counter()
                self.times += [now] * (lines - len(self.times))
            time.sleep(0.02)

    def wait(self, steps: int) -> None:
        while len(self.times) < steps:
            if self.process.poll() is not None:
                raise SystemExit(f"rapport train stopped: {self.process.stderr.read()[-2000:]}")
            time.sleep(0.05)

    def seconds_per_step(self, first: int, last: int) -> float:
        """Median seconds of steps first+1 .. last (1-based step lines)."""
        times = self.times[first - 1 : last]
        return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def setup(args, env, home: Path) -> None:
    """Import and score the training conversations; prepare the data with one step."""
    from bot.corpora import chitchat_conversations

    path = home / "chitchat.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, conversation in enumerate(chitchat_conversations()):
            if i == args.conversations:
                break
            turns = [{"role": r, "author": a, "text": t} for r, a, t in conversation.turns]
            f.write(json.dumps({"id": conversation.external_id, "turns": turns}) + "\n")
    for command in (["import", "jsonl", str(path)], ["score"]):
        done = subprocess.run(
            [sys.executable, "-m", "bot.loop.cli", *command],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"rapport {command[0]} failed: {done.stderr[-2000:]}")
    training = Training(args, (), env, home, steps=1)
    training.process.wait()
    if training.process.returncode:
        raise SystemExit(f"rapport train failed: {training.process.stderr.read()[-2000:]}")


def measure(args, overrides, env, home: Path) -> dict:
    steps = args.steps
    chat = Chat(args, overrides, env)
    alone = chat.measure()
    training = Training(args, overrides, env, home)
    training.wait(1)  # loaded, warmed up
    busy_from = len(training.times)
    beside = chat.measure()
    busy_to = len(training.times)
    training.wait(busy_to + 1 + steps)  # the step under way when the chat ended is skipped
    idle_bot = training.seconds_per_step(busy_to + 1, busy_to + 1 + steps)
    during_chat = (
        training.seconds_per_step(busy_from, busy_to) if busy_to - busy_from >= 2 else None
    )
    training.stop()
    chat.stop()
    training = Training(args, overrides, env, home)
    training.wait(1 + steps)
    train_alone = training.seconds_per_step(1, 1 + steps)
    training.stop()
    return {
        "chat_alone": alone,
        "chat_beside_training": beside,
        "train_alone_s": train_alone,
        "train_beside_idle_bot_s": idle_bot,
        "train_during_chat_s": during_chat,
    }


def row(name: str, r: dict) -> str:
    alone, beside = r["chat_alone"], r["chat_beside_training"]
    chat_kept = beside["rate"] / alone["rate"]
    train_kept = r["train_alone_s"] / r["train_beside_idle_bot_s"]
    during = r["train_during_chat_s"]
    return (
        f"{name:<17} {alone['ttft'] * 1000:>6.0f} {alone['rate']:>6.1f} "
        f"{beside['ttft'] * 1000:>8.0f} {beside['rate']:>6.1f} {chat_kept:>6.0%} "
        f"{r['train_alone_s']:>7.2f} {r['train_beside_idle_bot_s']:>7.2f} {train_kept:>6.0%} "
        f"{during if during is not None else float('nan'):>8.2f}"
    )


HEADER = (
    f"{'':<17} {'chat alone':>13} {'chat + training':>15} {'':>6} "
    f"{'train s/step':>15} {'':>6} {'train':>8}\n"
    f"{'settings':<17} {'TTFT':>6} {'tok/s':>6} {'TTFT ms':>8} {'tok/s':>6} {'kept':>6} "
    f"{'alone':>7} {'+idle':>7} {'kept':>6} {'+chat':>8}"
)

LEGEND = (
    "(kept: the chat's tokens/s beside the training / alone; the training's step rate "
    "beside the idle bot / alone; +chat: the training's s/step while the chat replies)"
)


def main() -> None:
    args = arguments()
    if args.chat_worker:
        chat_worker(args)
        return
    from learning_loop import machine  # this script's folder is on sys.path

    print(machine(), flush=True)
    home = Path(tempfile.mkdtemp(prefix="rapport-colocation-"))
    # the settings under test decide the OpenMP variables, not this shell's
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env |= {"RAPPORT_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    try:
        run(args, env, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(args, env: dict, home: Path) -> None:
    setup(args, env, home)
    print(
        f"{args.replies} replies of 40 tokens; psi, batch {args.batch_size} x "
        f"{args.max_tokens} tokens, {args.steps} steps per figure; medians",
        flush=True,
    )
    print(HEADER, flush=True)
    results = {}
    for name, overrides in SETTINGS.items():
        results[name] = measure(args, overrides, env, home)
        print(row(name, results[name]), flush=True)
    print(LEGEND)
    new = results["new settings"]
    chat_kept = new["chat_beside_training"]["rate"] / new["chat_alone"]["rate"]
    train_kept = new["train_alone_s"] / new["train_beside_idle_bot_s"]
    print(
        f"\nnew settings: the chat keeps {chat_kept:.0%} of its speed beside a training "
        f"(goal >= {GOAL:.0%}); the training keeps {train_kept:.0%} of its step rate beside "
        f"an idle bot (goal >= {GOAL:.0%}); load after: {os.getloadavg()[0]:.2f}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
