"""Soak: the Discord layer under simulated traffic for N minutes (issue 15).

Loopback only, bounded in time. What runs:

- The real :class:`bot.discord_bot.RapportClient` and its real handlers (``on_message``,
  ``on_raw_reaction_add``/``_remove``, the /new and /forget slash commands), fed with
  the spec'd fakes of discord.py objects from ``tests/discord_fakes.py``, over the real
  store in a fresh ``RAPPORT_HOME`` and a tiny random model (replies in milliseconds:
  this measures the plumbing, not the model).
- 20 users, each an asyncio task taking seeded random actions with think times:
  messages (sometimes two or three in a burst), 👍/👎 added and removed (sometimes
  toggled within milliseconds), 🔁, /new, /forget. Half are in DMs, half mention the bot
  in one shared channel and also vote on each other's replies. Each event is its own
  task, as discord.py's ``Client.dispatch`` makes it, so one user's events overlap.
- In another process (as ``rapport score`` and ``rapport deploy`` are; in this one their
  work would hold the GIL): ``rapport score``'s work (:func:`rewards.score.score_store`)
  every 15 s, a deploy of a second model version through the real gate at 40% of the
  run (``--no-gate``: the switch alone) and a rollback at 70% (:mod:`bot.loop.registry`);
  the bot follows through :class:`bot.loop.registry.DeployedPolicy`.
- A stall monitor: a task that sleeps 10 ms and records how late it wakes, and the
  garbage collector's pauses. Each stall over half the bound is taken apart: the loop
  thread's own CPU time during it (a blocking callback, or a collection on the loop),
  its wait for a core (``/proc/thread-self/schedstat``: the machine's load), the
  collector's pauses inside it (any thread's: a collection holds the GIL), and the rest
  (waiting for the GIL that a worker thread held). The bot's startup ends as
  ``rapport discord``'s does, with :func:`bot.discord_bot.settle_for_serving`.

Checked at the end (:mod:`bench.soak_checks`): every turn sent is stored exactly once
unless its user forgot it, in the order sent; each stored turn has its reply; votes in
the store equal the final reactions; replies after the deploy come from the new
version and after the rollback from the old one; a user who forgot has nothing left
from before; nothing failed; the largest stall and RSS growth within their bounds.
Prints a table; exits 1 if a check fails.

Run: ``.venv/bin/python bench/soak.py --minutes 10`` (60 for the record).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak_checks import (  # noqa: E402
    STALL_LIMIT_S,
    Outcome,
    check,
    print_table,
    rss_mib,
)
from bot.loop.cli import quiet_libraries  # noqa: E402

VOTE_EMOJI = ("👍", "👎")
RETRY = "🔁"
WORDS = (
    "hello how are you today I just got back from a long walk with my dog and the weather "
    "was lovely what do you think about music books films cooking coffee tea rain sun "
    "weekend plans work travel 😂 haha lol ¿qué tal? très bien ✨"
).split()
# Seconds of thinking between two actions of one user (exponential, this mean), and the
# action mix. Only every fourth user uses /forget (the others start anew instead): the
# others' rows must stay whole, and enough replies stay stored to check the versions.
THINK_S = 1.5
ACTIONS = (("message", 50), ("vote", 25), ("unvote", 12), ("retry", 3), ("new", 4), ("forget", 6))


class Event(NamedTuple):
    """One event a user caused, from dispatch to the handler's return."""

    kind: str
    started: float
    finished: float | None = None
    text: str = ""  # a message's text (unique: it ends with the user's tag and count)
    target: int | None = None  # the platform message a reaction is on
    emoji: str = ""  # a reaction's emoji


@dataclass
class SimUser:
    index: int
    member: object  # a fake discord.Member
    channel: object  # a fake DM or the shared text channel
    rng: random.Random
    # the events as plain tuples, which the garbage collector stops tracking (it never
    # untracks a NamedTuple or a dataclass): 55,000 tracked events made the harness's
    # own full collections 110 ms by the hour's end; a bot keeps no such log
    log: list[tuple] = field(default_factory=list)
    # platform message id -> the vote emoji of this user on it now, in the order added
    reactions: dict[int, list[str]] = field(default_factory=dict)
    count: int = 0

    @property
    def events(self) -> list[Event]:
        return [Event._make(e) for e in self.log]


class Soak:
    """One soak run in ``home`` (a fresh RAPPORT_HOME): :meth:`run` then :func:`check`."""

    def __init__(self, home: Path, seconds: float, users: int = 20, seed: int = 0, **timing):
        self.home, self.seconds, self.seed = home, seconds, seed
        self.think_s = timing.get("think_s", THINK_S)
        self.score_every_s = timing.get("score_every_s", 15.0)
        self.gate = timing.get("gate", True)
        self.n_users = users
        self.errors: list[str] = []
        self.inflight: set[asyncio.Task] = set()
        self.votable: dict[int, deque[int]] = {}  # channel id -> the bot's recent replies
        self.apologies: list[str] = []
        self.lags: list[float] = []
        self.gc_pauses: list[tuple[float, int]] = []
        # (start, end) perf_counter s, and the CPU s if it ran on the loop's thread
        self.gc_spans: deque[tuple[float, float, float]] = deque(maxlen=50)
        self.gc_cpu_pauses: list[float] = []  # CPU seconds of each collection
        self.tracked: list[tuple[str, int]] = []
        # (lag, seconds into the run, loop thread's CPU s, its wait for a core s, GC s,
        # CPU s of collections on the loop thread)
        self.worst: list[tuple[float, float, float, float, float, float]] = []
        self.score_runs: list[float] = []
        self.ops: list[tuple[str, float]] = []  # (deploy/rollback, seconds into the run)
        self.rss: dict[str, float] = {}

    # -- setup --------------------------------------------------------------------

    def setup(self) -> None:
        """Two tiny model versions, the store, the client, the users; warm the scorer."""
        from bot.config import DiscordConfig, load_config
        from bot.discord_bot import make_client, settle_for_serving
        from bot.loop.registry import DeployedPolicy
        from bot.store import Store
        from tests.discord_fakes import fake_client_user, fake_user
        from tests.tiny_models import save_tiny_model, save_tokenizer

        os.environ["RAPPORT_HOME"] = str(self.home)
        tokenizer = save_tokenizer(self.home / "tokenizer")
        self.db_path = self.home / "rapport.db"
        self.store = Store(self.db_path)
        for seed, version in ((0, "v1"), (1, "v2")):
            folder = save_tiny_model(self.home / version, tokenizer, seed=seed)
            self.store.add_model(version, str(folder), "prior" if seed == 0 else "psi")
        self.config = load_config(environ=soak_environ())
        self.policy_source = DeployedPolicy(self.store, self.config, seed=self.seed)
        discord_config = DiscordConfig(rate_limit_per_minute=10_000)  # measure the plumbing
        self.client = make_client(self.store, self.policy_source, discord_config)
        self.client._connection.user = fake_client_user()
        warm_scorer()
        settle_for_serving()  # as run_discord does before it connects
        shared = self.channel(dm=False)
        rng = random.Random(self.seed)
        self.users = [
            SimUser(
                i,
                fake_user(),
                self.channel(dm=True) if i % 2 == 0 else shared,
                random.Random(rng.random()),
            )
            for i in range(self.n_users)
        ]

    def channel(self, dm: bool):
        """A fake channel that keeps only the bot's recent replies (the soak's own memory
        must not grow) and notes which of them carry vote buttons."""
        from tests.discord_fakes import fake_channel

        channel = fake_channel(dm=dm, light=True)
        inner = channel.send
        recent = self.votable.setdefault(channel.id, deque(maxlen=30))

        async def send(content=None, **kwargs):
            message = await inner(content, **kwargs)
            channel.sent.clear()
            if content.startswith(("Sorry", "I can't")):
                self.apologies.append(content)
            add = message.add_reaction

            async def add_reaction(emoji):
                await add(emoji)
                if emoji == RETRY:  # the last button: the reply is linked and votable
                    recent.append(message.id)

            message.add_reaction = add_reaction
            return message

        channel.send = send
        return channel

    # -- the run ------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = loop.time()
        self.loop_thread = threading.get_ident()
        self.wall0 = datetime.now(UTC)  # the store's clock at t0
        self.epoch0 = time.time()  # the operator process's clock at t0
        self.deadline = self.t0 + self.seconds
        self.rss["start"] = rss_mib()
        monitor = asyncio.create_task(self.watch_loop())
        gc.callbacks.append(self.time_gc)
        operator_side = asyncio.create_task(asyncio.to_thread(self.operate))
        await asyncio.gather(*(self.act(user) for user in self.users))
        while self.inflight:  # the events still being handled
            await asyncio.wait(set(self.inflight))
        await operator_side
        gc.callbacks.remove(self.time_gc)
        if monitor.done():  # it never ends by itself: its measures would be cut short
            self.errors.append(f"the stall monitor failed: {monitor.exception()!r}")
        monitor.cancel()
        self.rss["end"] = rss_mib()
        self.tracked = tracked_types()

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def watch_loop(self, tick: float = 0.01) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before, cpu, waited = loop.time(), time.thread_time(), core_wait_s()
            started = time.perf_counter()
            await asyncio.sleep(tick)
            lag = loop.time() - before - tick
            self.lags.append(lag)
            if lag > STALL_LIMIT_S / 2:
                spans = [span for span in copied(self.gc_spans) if span[1] > started]
                in_gc = sum(
                    min(end, time.perf_counter()) - max(start, started) for start, end, _ in spans
                )
                gc_cpu_on_loop = sum(c for _, _, c in spans)
                cpu, waited = time.thread_time() - cpu, core_wait_s() - waited
                self.worst.append((lag, before - self.t0, cpu, waited, in_gc, gc_cpu_on_loop))
            if len(self.lags) == 1000 and "warm" not in self.rss:
                self.rss["warm"] = rss_mib()  # after 10 s of traffic: caches filled

    def time_gc(self, phase: str, info: dict) -> None:
        """The garbage collector's pauses, in any thread (a collection holds the GIL, so
        it stops the loop as any blocking call does)."""
        if phase == "start":
            self.gc_started, self.gc_cpu = time.perf_counter(), time.thread_time()
        else:
            ended, cpu = time.perf_counter(), time.thread_time() - self.gc_cpu  # its thread's
            self.gc_pauses.append((ended - self.gc_started, info["generation"]))
            self.gc_cpu_pauses.append(cpu)
            on_loop = threading.get_ident() == self.loop_thread
            self.gc_spans.append((self.gc_started, ended, cpu if on_loop else 0.0))

    def dispatch(self, user: SimUser, event: Event, coroutine) -> None:
        """Run a handler as its own task, as discord.py does for every gateway event."""
        index = len(user.log)
        user.log.append(tuple(event))
        task = asyncio.create_task(coroutine)
        self.inflight.add(task)

        def done(task: asyncio.Task) -> None:
            user.log[index] = tuple(event._replace(finished=self.now()))
            self.inflight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self.errors.append(f"user {user.index} {event.kind}: {task.exception()!r}")

        task.add_done_callback(done)

    async def act(self, user: SimUser) -> None:
        kinds, weights = zip(*ACTIONS, strict=True)
        loop = asyncio.get_running_loop()
        while loop.time() < self.deadline:
            await asyncio.sleep(user.rng.expovariate(1 / self.think_s))
            if loop.time() >= self.deadline:
                break
            kind = user.rng.choices(kinds, weights)[0]
            if kind == "forget" and user.index % 4 != 3:
                kind = "new"
            if kind == "message":
                for _ in range(1 if user.rng.random() < 0.8 else user.rng.randint(2, 3)):
                    self.message(user)
                    await asyncio.sleep(user.rng.uniform(0, 0.05))  # a burst
            elif kind in ("vote", "unvote", "retry"):
                self.react(user, kind)
            else:
                self.command(user, kind)

    def message(self, user: SimUser) -> None:
        from tests.discord_fakes import fake_message

        user.count += 1
        words = user.rng.choices(WORDS, k=user.rng.randint(1, 9))
        text = f"{' '.join(words)} [{user.index}.{user.count}]"
        me = self.client.user
        if user.index % 2:  # the shared channel: mention the bot
            message = fake_message(
                f"<@{me.id}> {text}", user.member, user.channel, [me], light=True
            )
        else:
            message = fake_message(text, user.member, user.channel, light=True)
        self.dispatch(
            user, Event("message", self.now(), text=text), self.client.on_message(message)
        )

    def react(self, user: SimUser, kind: str) -> None:
        from tests.discord_fakes import fake_reaction

        recent = self.votable[user.channel.id]
        if kind == "unvote":
            on = [(m, e) for m, emoji in user.reactions.items() for e in emoji]
            if not on:
                return
            target, emoji = user.rng.choice(on)
            user.reactions[target].remove(emoji)
            if not user.reactions[target]:
                del user.reactions[target]
            handler = self.client.on_raw_reaction_remove
        else:
            if not recent:
                return
            target = user.rng.choice(list(recent)[-5:])  # people react to recent replies
            if kind == "retry":
                emoji = RETRY
            else:
                emoji = user.rng.choice(VOTE_EMOJI)
                if emoji in user.reactions.get(target, []):
                    return  # Discord sends no event for a reaction already there
                user.reactions.setdefault(target, []).append(emoji)
            handler = self.client.on_raw_reaction_add
        payload = fake_reaction(target, user.member.id, emoji, user.channel.id, light=True)
        event = Event(kind, self.now(), target=target, emoji=emoji)
        self.dispatch(user, event, handler(payload))
        if kind == "vote" and user.rng.random() < 0.1:  # a quick toggle: on, then off
            user.reactions[target].remove(emoji)
            if not user.reactions[target]:
                del user.reactions[target]
            payload = fake_reaction(target, user.member.id, emoji, user.channel.id, light=True)
            event = Event("unvote", self.now(), target=target, emoji=emoji)
            self.dispatch(user, event, self.client.on_raw_reaction_remove(payload))

    def command(self, user: SimUser, name: str) -> None:
        from tests.discord_fakes import fake_interaction

        interaction = fake_interaction(user.member, user.channel, light=True)
        callback = self.client.commands_by_name[name].callback
        self.dispatch(user, Event(name, self.now()), callback(interaction))

    # -- the operator's side: another process, as `rapport score` and `deploy` are ---

    def operate(self) -> None:
        """Start :func:`operator` in its own process and collect what it reports: its
        work would hold the GIL in this one, which the bot's process never has to bear."""
        env = {**os.environ, **soak_environ(), "RAPPORT_HOME": str(self.home)}
        args = [sys.executable, str(Path(__file__)), "--operator", f"{self.seconds}"]
        args += ["--since", f"{self.epoch0}"]
        args += ["--score-every", f"{self.score_every_s}"] + ([] if self.gate else ["--no-gate"])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        for line in proc.stdout:
            kind, seconds, error = json.loads(line)
            if error:
                self.errors.append(f"{kind}: {error}")
            if kind == "score":
                self.score_runs.append(seconds)
            else:
                self.ops.append((kind, seconds))
        if proc.wait() != 0:
            self.errors.append(f"the operator process exited with {proc.returncode}")


def operator(seconds: float, since: float, score_every_s: float, gate: bool) -> None:
    """``rapport score``'s work every ``score_every_s`` seconds, a deploy of v2 at 40% of
    the run (through the real gate, or without it: ``gate`` False) and a rollback at 70%,
    with the real functions; one JSON line a job: [kind, seconds, error or null]. Times
    count from ``since`` (the soak's start, epoch seconds)."""
    from bot.config import load_config
    from bot.loop.registry import base_version, deploy, rollback, switch
    from bot.store import Store
    from rewards.score import score_store

    config = load_config()
    plan = [(0.4 * seconds, "deploy"), (0.7 * seconds, "rollback")]
    next_score = score_every_s
    with Store(config.database_path()) as store:
        # a switch still planned when the time is up (a score run that took the rest of
        # the run, on a loaded machine) happens late rather than never
        while (elapsed := time.time() - since) < seconds or plan:
            if plan and (elapsed >= plan[0][0] or elapsed >= seconds):
                _, kind = plan.pop(0)
            elif elapsed >= next_score:
                kind, next_score = "score", next_score + score_every_s
            else:
                time.sleep(0.05)
                continue
            error, job_started = None, time.time()
            try:
                if kind == "score":
                    score_store(store, config)
                elif kind == "rollback":
                    rollback(store, config, who="soak", why="soak")
                elif gate:
                    deploy(store, config, "v2", who="soak", why="soak", echo=lambda line: None)
                else:
                    base = base_version(store, config)
                    switch(store, "v2", base=base, action="deploy", who="soak", why="soak")
            except Exception as e:  # noqa: BLE001 - reported, and a failed check
                error = repr(e)
            done = time.time()
            seconds_taken = done - job_started if kind == "score" else done - since
            print(json.dumps([kind, seconds_taken, error]), flush=True)


def copied(items: deque) -> list:
    """A copy of a deque the collector's callback appends to: a collection can start
    (and append) while it is being copied, which ``list()`` reports as a RuntimeError."""
    while True:
        try:
            return list(items)
        except RuntimeError:
            continue


def tracked_types(top: int = 4) -> list[tuple[str, int]]:
    """The most common types among the objects a full collection walks (not frozen)."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    total = sum(counts.values())
    return [("all", total), *sorted(counts.items(), key=lambda kv: -kv[1])[:top]]


def core_wait_s() -> float:
    """Seconds this thread has spent runnable but waiting for a core (the kernel's
    schedstat; 0 where there is none)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def soak_environ() -> dict[str, str]:
    """The config: the tiny model registered as v1 serves 8-token replies; the gate is
    the tests' loose one, which a random model passes."""
    from tests.tiny_models import LOOSE_GATE

    return {
        **LOOSE_GATE,
        "RAPPORT_MODEL_PATH": "v1",
        "RAPPORT_GENERATION_MAX_NEW_TOKENS": "8",
    }


def warm_scorer() -> None:
    """Convert MiniLM for `rapport score` before the clock starts (once per
    RAPPORT_HOME), as a machine that has scored before has it."""
    from rewards import embedding

    if embedding.BACKEND == "openvino":
        embedding.openvino_model_dir()


def run_soak(home: Path, seconds: float, users: int = 20, seed: int = 0, **timing) -> Outcome:
    """Set up, run for ``seconds``, and check; the outcome holds every measure."""
    soak = Soak(home, seconds, users, seed, **timing)
    soak.setup()
    try:
        asyncio.run(soak.run())
        return check(soak)
    finally:
        soak.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (60 for the record)")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the soak's RAPPORT_HOME")
    parser.add_argument("--no-gate", action="store_true", help="deploy without the gate")
    parser.add_argument("--operator", type=float, help=argparse.SUPPRESS)  # the other side
    parser.add_argument("--since", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--score-every", type=float, default=15.0, help="seconds")
    args = parser.parse_args(argv)
    quiet_libraries()  # as `rapport` itself: the operator's first score warned (LeafSpec)
    if args.operator is not None:
        operator(args.operator, args.since, args.score_every, gate=not args.no_gate)
        return 0
    home = Path(tempfile.mkdtemp(prefix="rapport-soak-"))
    try:
        outcome = run_soak(
            home,
            args.minutes * 60,
            args.users,
            args.seed,
            score_every_s=args.score_every,
            gate=not args.no_gate,
        )
    finally:
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    print_table(outcome)
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
