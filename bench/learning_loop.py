"""The product's own proof: the loop as deployed learns from how people react.

1. The deployed model (the prior, SmolLM2-135M-Instruct) chats with simulated users
   (``rapport simulate``: the prior prompted as a person, on the training openers);
   its own replies are logged, with cut replies marked, and scored (``rapport score``).
2. Each learner trains from those logs (``rapport train``) on one reward: (a)
   ``bot_question`` alone, the paper's exploit case; (b) ``combined``, the default
   implicit reward. Rows: the KL-control family (psi, kl_q, g, batch_q) and the peers a
   researcher would try first: filtered behaviour cloning (``bc`` on the turns above
   average) and trl's KTO (liked = reward above the mean). In (a) a row compares learners
   at equal KL from the prior: ``bc@psi`` trains bc until its KL reaches psi's (a KL
   budget, ``rapport train --kl-budget``), at a quarter of the learning rate
   (``--matched-lr``) so that one step cannot overshoot it by much; ``psi@bc`` (psi
   trained on until it reaches bc's) is not a default row: past one epoch psi diverges
   (RESULTS.md, fourth run), so ask for it with ``--algos``. B may also be a number, a
   training KL: ``--algos psi@0.1,bc@0.1`` trains both at the matched lr until each
   reaches 0.1, the same budget and lr for both sides. Rows compared at equal KL get a
   column of their own: the targeted reward minus their peer's (B, or the first row with
   the same budget), paired by opener. (b) has the six learners
   (``--algos-b``). And in (a) the cheapest baseline of all, no training:
   ``prior+best-of-N``, the prior sampling N replies and sending the one the targeted
   reward ranks highest (its KL column is the bound log N - (N-1)/N nats per reply
   spread over its tokens; best-of-N has no per-token policy to measure).
3. Every trained version and the prior are evaluated together (``rapport eval``) on
   held-out openers none of them trained on: (a) one reply to each of ``--eval-n``
   distinct openers; (b) ``--eval-n-b`` conversations of ``--eval-turns-b`` bot turns,
   since the combined reward reads the user's reply.

Columns: the targeted reward, and the same minus the prior's row (paired by opener),
question rate, KL(π‖prior) per token, perplexity of the replies under the prior, that
perplexity over the prior's row's (paired by opener, as the 1.3x bound is judged),
distinct-2, each with its 95% interval (percentile bootstrap over conversations;
jackknife for distinct-2). The evaluation samples paired (``rapport eval``'s common
random numbers: every row draws each token with the same keyed noise), which is what
makes the paired columns sharper than two rows' intervals side by side. During the training runs of
``--curve-rewards`` (default (a)), every ``--curve-every`` steps the policy answers the
first ``--curve-n`` of the table's held-out openers and the targeted reward and KL are
recorded; each curve starts at the prior's row and ends at the model's own row of the
table (all the openers): the learning curves, plotted into the HTML report.

Run: ``.venv/bin/python bench/learning_loop.py`` (``make learning-loop``). The defaults
are sized for 2 CPU cores (48 conversations, 16 steps; the settings are in the table's
header; the KL-control rows in rapport's dueling form, with a target network that keeps
up in 16 steps, τ = 0.05: RESULTS.md, thirteenth run): on 2 idle cores of an Intel
Xeon @ 2.60GHz without native bf16 the whole bench took 49 minutes, of which
simulation and (a) ~31 and (b) ~18 (RESULTS.md, tenth run); the same code would take
about 65-70 on the slower 2.80GHz Xeon of the ninth run (73 minutes with the code before
it), and 89-125 on 2 cores of an AMD EPYC without AVX512, where simulation and (a)
took 58-83 (eleventh, twelfth and fifteenth runs; 89 minutes in all in the
fifteenth); ``--rewards bot_question`` runs (a) alone. With ``--curve-n 16`` each
interior point's question rate has a 95% interval about +-0.2 wide (plotted as error
bars; the ends, on 200 openers, about +-0.06): on CPU the interior points show the KL's
trajectory, the reward's mostly its noise.
On a GPU, larger settings, e.g. ``--simulate 512 --steps 300 --eval-n 500``
(``bench/gpu_check.sh`` runs it). Writes ``results.json``, ``table.md``, ``curves.png``
and ``index.html`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ALGOS = ("psi", "kl_q", "g", "batch_q", "bc", "kto", "bc@psi")
# (b): the same learners; no equal-KL row (on 191 turns nothing moved the combined reward,
# so there is no gain to compare at equal KL), and psi@bc is a diagnostic (psi trained past
# one epoch diverges: RESULTS, fourth run), run with --algos.
ALGOS_B = ("psi", "kl_q", "g", "batch_q", "bc", "kto")
MATCHED_STEPS = 6  # "A@B" may train up to this many times --steps to reach B's KL
REWARDS = ("bot_question", "combined")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--simulate", type=int, default=48, help="self-play conversations to learn from")
    add("--turns", type=int, default=3, help="bot turns per simulated conversation")
    add("--algos", default=",".join(ALGOS), help="(a)'s rows (and (b)'s without --algos-b)")
    add("--algos-b", default=None, help=f"(b)'s rows (default: {','.join(ALGOS_B)})")
    add("--rewards", default=",".join(REWARDS))
    add("--max-new-tokens", type=int, default=64, help="reply length limit (chat: 96)")
    add("--steps", type=int, default=16)
    add("--warmup", type=int, default=4, help="linear learning-rate warm-up steps")
    add("--batch-size", type=int, default=4)
    add("--max-tokens", type=int, default=256)
    add("--lr", type=float, default=1e-4, help="KL-control, bc and kto alike")
    add(
        "--matched-lr",
        type=float,
        default=0.25,
        help="A@B rows train at this fraction of --lr, so that one step moves A's KL by "
        "much less than B's (at the full lr bc's KL jumped 0.09 -> 0.22 in one step, past "
        "psi's 0.12: RESULTS.md, fourteenth run)",
    )
    add("--td-lambda", type=float, default=1.0, help="KL-control learners only (rapport's default)")
    add(
        "--tau",
        type=float,
        default=0.05,
        help="KL-control learners only: the target's Polyak rate (rapport's default 0.005 "
        "moves the target 63%% of the way in its 200 default steps; 0.05 moves it 56%% in "
        "the bench's 16)",
    )
    add(
        "--dueling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="KL-control learners: Q = log pi + V (rapport's default); --no-dueling: the raw "
        "form, Q = logit - b, as the runs before the thirteenth",
    )
    add("--value-lr", type=float, default=1e-3, help="dueling: the value head's own lr")
    add(
        "--value-fit",
        type=int,
        default=0,
        help="dueling: fit the value head on this many windows before the first step "
        "(rapport train --value-fit; 0: it starts at zero)",
    )
    add("--eval-n", type=int, default=200, help="(a): held-out openers, one reply each")
    add("--eval-n-b", type=int, default=24, help="(b): held-out conversations")
    add("--eval-turns-b", type=int, default=2)
    add("--curve-every", type=int, default=8, help="0: no learning curves")
    add("--curve-rewards", default="bot_question", help="the rewards whose runs get curves")
    add("--curve-n", type=int, default=16)
    add("--best-of", type=int, default=4, help="(a): a 'prior+best-of-N' row; 0: none")
    add("--seed", type=int, default=0)
    add("--home", default="", help="RAPPORT_HOME to use (kept; default: a new temp dir)")
    add(
        "--reuse",
        action="store_true",
        help="reuse the runs in --home trained with the same settings (a finished run is "
        "not trained again: e.g. to evaluate after a stopped bench; no learning curve then)",
    )
    add("--out", default="bench/out/learning_loop")
    return parser.parse_args()


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    )
    return f"{platform.node()}: {cpu}, {device}, load {os.getloadavg()[0]:.2f}"


def simulate_and_score(args, config, store, prior_dir) -> dict:
    from bot.policy import (
        DEFAULT_MODEL_NAME,
        Settings,
        batch_precision,
        load_model,
        prepare_for_serving,
    )
    from learner.simulate import simulate_into_store
    from rewards.score import score_store

    began = time.perf_counter()
    model, tokenizer = load_model(prior_dir)
    served = prepare_for_serving(model, batch_precision())
    simulate_into_store(
        store,
        served,
        served,
        tokenizer,
        version=DEFAULT_MODEL_NAME,
        n=args.simulate,
        turns=args.turns,
        seed=args.seed,
        batch=32,
        system_prompt=config.model.system_prompt,
        settings=Settings.from_config(config.generation),
        progress=lambda k: print(f"  simulated {k} more", file=sys.stderr, flush=True),
    )
    score_store(store, config)  # scores what is not scored yet (all of it, unless --home reused)
    bots, cut = store.db.execute(
        "SELECT COUNT(*), SUM(json_extract(generation, '$.cut') IS NOT NULL) FROM messages "
        "WHERE role = 'bot'"
    ).fetchone()
    return {
        "conversations": args.simulate,
        "bot_turns": bots,
        "cut_turns": cut,
        "seconds": time.perf_counter() - began,
    }


class Curve:
    """The learning curve of one training run: every ``every`` steps inside the run, the
    policy's targeted reward and KL on the first ``--curve-n`` of the table's held-out
    openers. Its two ends are the table's own rows (:func:`curve_ends`): the prior's at
    step 0 and the trained model's at its last step, both on all ``--eval-n`` openers,
    so no curve measures again what the table measures (five learners' last points and
    the prior's first cost ~4 of the bench's minutes)."""

    def __init__(self, args, config, target, prior, tokenizer, last_step: int):
        self.args, self.config, self.target = args, config, target
        self.prior, self.tokenizer = prior, tokenizer
        self.last_step = last_step
        self.points: list[dict] = []

    def measure(self, step: int, q) -> None:
        from bot.policy import Settings
        from learner.evaluation import evaluate

        training = q.training
        results = evaluate(
            {"policy": (_served_copy(q), self.tokenizer)},
            self.prior,
            self.prior,
            self.tokenizer,
            n=self.args.curve_n,
            turns=1 if self.target == "bot_question" else self.args.eval_turns_b,
            seed=self.args.seed + 2,  # the table's openers (held_out_openers: a prefix)
            system_prompt=self.config.model.system_prompt,
            settings=Settings.from_config(self.config.generation),
            weights=dataclasses.asdict(self.config.weights),
            answer_last=self.target == "combined",  # combined reads the user's answer
        )
        q.train(training)
        self.points.append(curve_point(results["policy"], step, self.target, self.args.curve_n))

    def observe(self, step: int, q) -> None:
        inside = 0 < step < self.last_step
        if self.args.curve_every and inside and step % self.args.curve_every == 0:
            self.measure(step, q)


# reward -> the prior measured on the interior points' openers (the first --curve-n of
# the table's): a reference line in the plot. The curves' ends are on all the openers,
# whose question rate is not the first 16's, so an interior point is read against this.
BASELINE: dict[str, dict] = {}


def curve_point(row: dict, step: int, target: str, openers: int) -> dict:
    """One point of a learning curve from an evaluation row (with 95% intervals)."""
    point = {"step": step, "openers": openers, "bot_question": row["bot_question"]["value"]}
    for name, column in (("targeted", target), ("kl_to_prior", "kl_to_prior")):
        point |= {
            name: row[column]["value"],
            f"{name}_interval": [row[column]["low"], row[column]["high"]],
        }
    return point


def curve_ends(args, reward: str, trained: dict, results: dict) -> None:
    """Close every curve of ``trained`` (in place) with the table's rows: the prior's at
    step 0 and the model's own at the step it stopped; a curve point measured during
    training at or after that step is dropped (a KL budget can stop a run on it)."""
    target = "bot_question" if reward == "bot_question" else "combined"
    n = args.eval_n if reward == "bot_question" else args.eval_n_b
    for name, run in trained.items():
        if not run.get("curved") or name not in results or "prior" not in results:
            continue
        last = run["metrics"].get("step", 0)
        inside = [p for p in run["curve"] if 0 < p["step"] < last]
        start = curve_point(results["prior"], 0, target, n)
        run["curve"] = [start, *inside, curve_point(results[name], last, target, n)]


def _served_copy(model):
    """A copy of the network in training, as the bench serves every model (bf16 where
    the CPU has it natively, else fp32 in the CPU's ``bot.policy.fp32_layout``)."""
    import copy

    from bot.policy import batch_precision, prepare_for_serving

    return prepare_for_serving(copy.deepcopy(model), batch_precision()).eval()


def train_all(args, config, store, prior_dir, reward, prior_served, tokenizer) -> dict:
    """{algo: {version, folder, metrics, curve, seconds}} for one reward."""
    from learner.config import TrainConfig
    from learner.kl_control import ALGORITHMS
    from learner.pipeline import run_training

    target = "bot_question" if reward == "bot_question" else "combined"
    out = {}
    names = [a for a in algos_for(args, reward).split(",") if a]  # "": the prior alone
    for name in names:
        algo, _, matched = name.partition("@")
        began = time.perf_counter()
        train_config = TrainConfig(
            algo=algo,
            reward=reward,
            steps=args.steps * (MATCHED_STEPS if matched else 1),
            batch_size=args.batch_size,
            max_tokens=args.max_tokens,
            lr=args.lr * (args.matched_lr if matched else 1),
            warmup_steps=args.warmup,
            seed=args.seed,
            checkpoint_every=10_000,
            log_every=1 if matched else KL_EVERY,
            pairs_from="combined" if algo == "kto" else "votes",
            kl_budget=budget_of(matched, out) if matched else 0.0,
        )
        if algo in ALGORITHMS:  # bc and kto keep their runs (and --reuse finds them)
            train_config.td_lambda, train_config.tau = args.td_lambda, args.tau
            train_config.dueling, train_config.value_lr = args.dueling, args.value_lr
            train_config.value_fit = args.value_fit
        done = finished_run(train_config) if args.reuse else None
        if done:
            out[name] = {
                "version": done.name,
                "folder": str(done / "model"),
                "metrics": json.loads((done / "model" / "training.json").read_text())["metrics"],
                "last_kl": last_kl(done / "model"),
                "curve": [],
                "seconds": 0.0,
                "reused": True,
            }
            print(f"[{reward}] reusing {name}: {done}", file=sys.stderr, flush=True)
            continue
        curve = Curve(args, config, target, prior_served, tokenizer, train_config.steps)
        curves = bool(args.curve_every) and reward in args.curve_rewards.split(",")
        curves = curves and ALIASES.get(name) not in names  # g's curve is psi's (ALIASES)
        observed = curves and algo != "kto"  # trl's trainer has its own loop
        if observed and args.curve_every < train_config.steps and reward not in BASELINE:
            # the prior on the interior points' own openers
            curve.measure(0, prior_served)
            BASELINE[reward] = curve.points.pop()
        steps = f"up to {train_config.steps} steps, to KL {train_config.kl_budget:.3f}"
        print(
            f"[{reward}] training {name} for {steps if matched else f'{args.steps} steps'}",
            file=sys.stderr,
            flush=True,
        )
        version, folder, metrics = run_training(
            store,
            prior_dir,
            "prior",
            config.model.system_prompt,
            train_config,
            observe=curve.observe if observed else None,
        )
        out[name] = {
            "version": version,
            "folder": str(folder),
            "metrics": metrics,
            "last_kl": last_kl(folder),
            "curve": curve.points,  # closed by curve_ends after the evaluation
            "curved": curves,
            "seconds": time.perf_counter() - began,
        }
        print(f"  {name}: {metrics}", file=sys.stderr, flush=True)
    return out


# Every learner measures its KL to the prior on its training batches (every KL_EVERY
# steps; "A@B" every step, so that it stops within a step of the budget); "A@B" trains A
# until its latest measurement reaches B's last one: the same statistic on both sides, so
# A and B are compared at equal KL. (A mean over several measurements lags: filtered bc
# gains ~0.05 nats/token a step and overshot psi's KL 2.6x when stopped on a mean of 3.)
# A measurement is two forwards of the batch (~3 s on 2 cores); the last step always
# measures, and the bench reads only that one, so every 8 steps (not 4) saves ~1 minute.
KL_EVERY = 8


def budget_of(matched: str, trained: dict) -> float:
    """The KL budget of an "A@B" row: B's last training KL when B is a row trained before
    it, or B itself when it is a number ("psi@0.1": psi until its training KL reaches 0.1,
    so that two learners can be stopped at the same budget at the same lr)."""
    if matched in trained:
        return trained[matched]["last_kl"]
    try:
        return float(matched)
    except ValueError:
        raise SystemExit(f"{matched!r} in an A@B row is neither a row before it nor a KL") from None


def peers(names) -> dict[str, str]:
    """{row: the row it is compared with head to head, at equal KL}: "A@B" with B when B
    is a row, and rows stopped at the same numeric budget ("psi@0.1", "bc@0.1") with the
    first of them."""
    out, first = {}, {}
    for name in names:
        _, _, matched = name.partition("@")
        if not matched:
            continue
        if matched in names:
            out[name] = matched
        elif matched in first:
            out[name] = first[matched]
        else:
            first[matched] = name
    return out


def algos_for(args, reward: str) -> str:
    if reward == "bot_question" or args.algos_b is None and args.algos != ",".join(ALGOS):
        return args.algos
    return args.algos_b if args.algos_b is not None else ",".join(ALGOS_B)


def finished_run(config) -> Path | None:
    """The newest registered run under $RAPPORT_HOME/runs trained with exactly ``config``."""
    from bot.config import rapport_home

    wanted = json.loads(config.to_json())
    found = None
    for done in sorted((rapport_home() / "runs").glob("*/model/training.json")):
        run = done.parent.parent
        if saved_config(run) == wanted:
            found = run
    return found


def saved_config(run: Path) -> dict:
    """The TrainConfig a run saved: beside its model (KL-control, bc) or in it (trl's),
    read as rapport reads it (a setting added since takes the value that reproduces the
    old run, :meth:`TrainConfig.from_json`), so that --reuse finds runs saved before it."""
    from learner.config import TrainConfig

    for path in (run / "train_config.json", run / "model" / "train_config.json"):
        if path.exists():
            return dataclasses.asdict(TrainConfig.from_json(path))
    return {}


def last_kl(folder) -> float:
    """A finished run's last KL measurement on its training batch (0.0 for trl's runs)."""
    path = Path(folder).parent / "metrics.jsonl"
    if not path.exists():
        return 0.0
    kls = [json.loads(line).get("kl_to_prior") for line in path.read_text().splitlines() if line]
    kls = [k for k in kls if k is not None]
    return kls[-1] if kls else 0.0


# A trained row whose served policy is another's within this KL (nats/token, measured on
# logged bot turns) is evaluated once: g is psi re-parameterised (identical TD errors,
# learner.kl_control), so its weights differ from psi's by rounding (~4e-5) and its table
# was psi's to the last digit in every run; evaluating it again cost ~5 minutes.
SAME_POLICY_KL = 1e-4
ALIASES = {"g": "psi"}


def logged_conversations(store, n: int) -> list:
    """The first ``n`` logged conversations as games (``.turns``) for :func:`kl_inputs`."""
    from types import SimpleNamespace

    from bot.prompt import Turn

    ids = [r[0] for r in store.db.execute("SELECT id FROM conversations ORDER BY id LIMIT ?", [n])]
    games = []
    for cid in ids:
        turns = [Turn(m.role, m.text) for m in store.messages(cid) if m.replaced_by is None]
        if any(t.role == "bot" for t in turns):
            games.append(SimpleNamespace(turns=turns))
    return games


def policy_kl(policy, other, games, tokenizer, system_prompt) -> float:
    """Mean over ``games``' bot tokens of KL(policy ‖ other) per token."""
    from learner.evaluate import kl_per_tokens
    from learner.evaluation import kl_inputs

    seqs, positions = zip(*kl_inputs(games, tokenizer, system_prompt), strict=True)
    kls = kl_per_tokens(policy, other, seqs, positions)
    return sum(kls) / len(kls)


def evaluate_all(args, config, reward, trained, prior_served, tokenizer, store=None) -> dict:
    from bot.policy import Settings, batch_precision, load_model, prepare_for_serving
    from learner.evaluation import evaluate
    from learner.simulate import Rerank

    models = {"prior": (prior_served, tokenizer)}
    for algo, run in trained.items():
        model, _ = load_model(run["folder"])
        models[algo] = (prepare_for_serving(model, batch_precision()), tokenizer)
    same = {}  # row -> (the row it is evaluated as, KL between their served policies)
    if store is not None:
        games = logged_conversations(store, 16)
        for row, twin in ALIASES.items():
            if row in models and twin in models and games:
                kl = policy_kl(
                    models[row][0], models[twin][0], games, tokenizer, config.model.system_prompt
                )
                print(f"  KL({row} ‖ {twin}) = {kl:.2e} nats/token", file=sys.stderr, flush=True)
                if kl < SAME_POLICY_KL:
                    same[row] = (twin, kl)
                    del models[row]
    a = reward == "bot_question"
    rerank = {}
    if a and args.best_of > 1:  # ranked by the reward the learners train on (see below)
        name = f"prior+best-of-{args.best_of}"
        models[name] = (prior_served, tokenizer)
        rerank[name] = Rerank(args.best_of, question_ranker)
    began = time.perf_counter()
    results = evaluate(
        models,
        prior_served,
        prior_served,
        tokenizer,
        n=args.eval_n if a else args.eval_n_b,
        turns=1 if a else args.eval_turns_b,
        seed=args.seed + 2,
        system_prompt=config.model.system_prompt,
        settings=Settings.from_config(config.generation),
        weights=dataclasses.asdict(config.weights),
        progress=lambda k: print(f"  evaluated {k} more", file=sys.stderr, flush=True),
        answer_last=not a,  # (a) measures the bot's replies alone
        rerank=rerank,
        reference="prior",  # each row's perplexity over the prior's, paired by opener
        versus=peers(list(trained)),  # the equal-KL rows, head to head
    )
    results["seconds"] = time.perf_counter() - began
    for row, (twin, kl) in same.items():
        results[row] = {**results[twin], "same_as": twin, "kl_to_same": kl}
    # the table's rows in training order, as before
    order = ["prior", *trained, *(k for k in results if k not in trained and k != "prior")]
    return {k: results[k] for k in order if k in results}


def question_ranker(user: str, replies: list[str]) -> list[tuple[float, float]]:
    """Best-of-N's ranking in (a): the targeted reward itself (``bot_question`` reads the
    reply alone), the reward every learner of (a) trains on; its spread is 0. (b)'s
    combined reward reads the user's answer, which no reply has before it is sent: it
    would need a learned model of the reaction, so (b) has no best-of-N row."""
    from rewards.bot_question import bot_question
    from rewards.context import Context

    return [(v, 0.0) for v in bot_question([Context(r, prev_user=user) for r in replies])]


def cell(column: dict) -> str:
    return f"{column['value']:.3f} [{column['low']:.3f}, {column['high']:.3f}]"


def steps_cell(run: dict | None) -> str:
    """How far a row trained: its steps, and for "A@B" the budget it stopped on."""
    if not run:
        return "-"
    metrics = run["metrics"]
    budget = saved_config(Path(run["folder"]).parent).get("kl_budget", 0.0)
    if not budget:
        return str(metrics.get("step", "-"))
    how = "stopped" if metrics.get("stopped") == "kl_budget" else "not reached"
    return f"{metrics['step']} (KL budget {budget:.3f}: {how})"


def table(reward: str, results: dict, trained: dict | None = None) -> str:
    target = "bot_question" if reward == "bot_question" else "combined"
    header = (
        f"| model | steps | {target} (targeted) | targeted - prior's (paired) | question rate "
        "| KL/token | perplexity | perplexity / prior's (paired) | distinct-2 |"
    )
    head_to_head = any("versus" in row for row in results.values() if isinstance(row, dict))
    if head_to_head:  # the equal-KL rows' paired difference from their peer
        header += " targeted - equal-KL peer's (paired) |"
    lines = [header, "|---" * header.count(" |") + "|"]
    for name, row in results.items():
        if name in ("samples", "seconds"):
            continue
        cells = [
            steps_cell((trained or {}).get(name)),
            cell(row[target]),
            cell(row["difference"][target]) if "difference" in row else "-",
            cell(row["bot_question"]),
            cell(row["kl_to_prior"]),
            cell(row["perplexity"]),
            cell(row["perplexity_ratio"]) if "perplexity_ratio" in row else "-",
            cell(row["distinct_2"]),
        ]
        if head_to_head:
            versus = row.get("versus")
            cells.append(
                f"{cell(versus['difference'][target])} vs {versus['row']}" if versus else "-"
            )
        if "same_as" in row:  # evaluated as its twin: the served policies agree
            kl = row["kl_to_same"]  # a float sum: can round to just below 0
            name = f"{name} (= {row['same_as']}: KL {f'{kl:.0e}' if kl > 0 else '~0'}/token)"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict, path: Path, baselines: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a panel per reward that has curves (--curve-rewards); one empty panel if none
    rewards = [r for r in curves if any(curves[r].values())] or list(curves)[:1]
    fig, axes = plt.subplots(2, len(rewards), figsize=(6 * len(rewards), 7), squeeze=False)
    for j, reward in enumerate(rewards):
        for algo, points in curves[reward].items():
            if not points:
                continue
            steps = [p["step"] for p in points]
            for row, column in ((0, "targeted"), (1, "kl_to_prior")):
                values = [p[column] for p in points]
                # the 95% interval of each point (on --curve-n openers: wide at CPU sizes)
                spans = [
                    p.get(f"{column}_interval", [v, v]) for p, v in zip(points, values, strict=True)
                ]
                below = [v - lo for v, (lo, _) in zip(values, spans, strict=True)]
                above = [hi - v for v, (_, hi) in zip(values, spans, strict=True)]
                axes[row][j].errorbar(
                    steps, values, yerr=[below, above], marker="o", capsize=3, label=algo
                )
        start = (baselines or {}).get(reward)
        if start:  # the prior on the interior points' openers, with its interval
            for row, column in ((0, "targeted"), (1, "kl_to_prior")):
                low, high = start[f"{column}_interval"]
                axes[row][j].axhspan(low, high, color="grey", alpha=0.15)
                axes[row][j].axhline(
                    start[column],
                    color="grey",
                    linestyle=":",
                    label=f"prior on the interior points' {start['openers']} openers",
                )
        axes[0][j].set_title(f"reward: {reward} (ends: the table's rows)")
        axes[0][j].set_ylabel("targeted reward (held-out, 95% interval)")
        axes[1][j].set_ylabel("KL(π‖prior) per token")
        axes[1][j].set_xlabel("training step")
        if any(curves[reward].values()):
            axes[0][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    args = arguments()
    home = Path(args.home or tempfile.mkdtemp(prefix="rapport-learning-loop-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["RAPPORT_HOME"] = str(home)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from bot.config import Config
    from bot.policy import batch_precision, default_model_dir, load_model, prepare_for_serving
    from bot.store import Store

    config = Config()
    config.generation.max_new_tokens = args.max_new_tokens
    began = time.perf_counter()
    header = machine()
    print(header, file=sys.stderr)
    prior_dir = default_model_dir()
    prior, tokenizer = load_model(prior_dir)
    prior_served = prepare_for_serving(prior, batch_precision())
    report = {"machine": header, "settings": vars(args), "rewards": {}}
    with Store(home / "rapport.db") as store:
        report["logs"] = simulate_and_score(args, config, store, prior_dir)
        print(f"logs: {report['logs']}", file=sys.stderr, flush=True)
        for reward in args.rewards.split(","):
            trained = train_all(args, config, store, prior_dir, reward, prior_served, tokenizer)
            results = evaluate_all(args, config, reward, trained, prior_served, tokenizer, store)
            curve_ends(args, reward, trained, results)
            report["rewards"][reward] = {"trained": trained, "eval": results}
            report["rewards"][reward]["curve_baseline"] = BASELINE.get(reward)
            print(f"\n(reward: {reward})\n" + table(reward, results, trained), flush=True)
            # kept as each reward finishes: a bench stopped in (b) still has (a)
            (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    report["minutes"] = (time.perf_counter() - began) / 60
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    settings = (
        f"{args.simulate} simulated conversations x {args.turns} bot turns; {args.steps} steps "
        f"x {args.batch_size} windows of <= {args.max_tokens} tokens, lr {args.lr} "
        f"(A@B rows: {args.lr * args.matched_lr:g}), "
        f"KL-control lambda {args.td_lambda} tau {args.tau} "
        f"{'dueling' if args.dueling else 'raw'}"
        f"{f' (value fit on {args.value_fit} windows)' if args.value_fit else ''}; "
        f"(a) {args.eval_n} held-out openers, (b) {args.eval_n_b} x {args.eval_turns_b} turns; "
        f"simulation and scoring {report['logs']['seconds'] / 60:.1f} min"
    )
    md = [f"{time.strftime('%Y-%m-%d')}, {header}, {report['minutes']:.0f} min; {settings}"]
    for reward, r in report["rewards"].items():
        times = ", ".join(f"{a} {t['seconds'] / 60:.1f}" for a, t in r["trained"].items())
        md += [
            "",
            f"Reward: {reward} (minutes: training {times}; evaluation "
            f"{r['eval']['seconds'] / 60:.1f})",
            "",
            table(reward, r["eval"], r["trained"]),
        ]
    (out / "table.md").write_text("\n".join(md) + "\n")
    curves = {
        reward: {a: t["curve"] for a, t in r["trained"].items()}
        for reward, r in report["rewards"].items()
    }
    baselines = {reward: r.get("curve_baseline") for reward, r in report["rewards"].items()}
    plot(curves, out / "curves.png", baselines)
    html = ["<html><body><h1>rapport: the learning loop</h1>", f"<p>{md[0]}</p>"]
    for reward, r in report["rewards"].items():
        html.append(f"<h2>{reward}</h2><pre>{table(reward, r['eval'], r['trained'])}</pre>")
    html.append('<h2>Learning curves</h2><img src="curves.png">')
    (out / "index.html").write_text("\n".join(html) + "</body></html>\n")
    print(
        f"\nwrote {out}/table.md, results.json, curves.png, index.html "
        f"({report['minutes']:.0f} min)"
    )


if __name__ == "__main__":
    main()
