"""The ``rapport`` command: one entry point, one small function a subcommand.

Global options (``--config``, ``--set``) build the :class:`~bot.config.Config` once and
hand it to the subcommand through click's context. Errors a user can act on
(:class:`~bot.errors.RapportError`) are printed as one line and exit with status 1;
anything else is a bug and keeps its traceback.

Commands import what they run: the modules that load torch and transformers (policy,
session, registry, learner, scoring) take ~5 s, so they are imported inside the command
that needs them, and `rapport --help`, `db`, `models`, `runs` start in under a second.
That is the only reason for an import inside a function here (tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import sqlite3
import sys
import warnings
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bot import processes
from bot.check import check
from bot.config import Config, load_config, rapport_home
from bot.corpora import CHITCHAT_PLATFORM, BadLine, chitchat_conversations, jsonl_conversations
from bot.errors import RapportError
from bot.files import new_file
from bot.model_files import check_folder
from bot.progress import progress
from bot.store import Store
from learner.config import TOKEN_LEVEL, TrainConfig
from learner.runs import list_runs, prune

if TYPE_CHECKING:
    from bot.policy import Policy


def open_store(config: Config) -> Store:
    """The one way every command opens the database."""
    return Store(config.database_path(), busy_timeout_s=config.store.busy_timeout_s)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar=None,
    help="TOML config file (default: $RAPPORT_CONFIG, else $RAPPORT_HOME/rapport.toml).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config value; repeatable.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """rapport: a chat bot that learns what people enjoy from how they react."""
    ctx.obj = load_config(config_path, overrides)
    # before any command imports torch (bot/processes.py): batch work yields to serving
    processes.apply(ctx.obj.processes.settings(processes.kind_of(ctx.invoked_subcommand)))


def load_policy(config: Config, store: Store, seed: int | None = None, ranker=None) -> Policy:
    """The one way every command loads the model it serves (config ``model.path``)."""
    from bot.policy import Policy

    registered = {m["version"]: m["path"] for m in store.models()}
    return Policy.load(
        config.model, config.generation, registered=registered, seed=seed, ranker=ranker
    )


def best_of_ranker(config: Config):
    """Best-of-N's ranking model (the newest trained reward model), or None: with
    ``generation.best_of`` 1, or when none is trained (one line says so)."""
    if config.generation.best_of <= 1:
        return None
    from rewards.rank import RewardRanker

    ranker = RewardRanker.latest(rapport_home() / "reward_models")
    if ranker is None:
        click.echo(
            f"generation.best_of is {config.generation.best_of}, but no reward model is "
            "trained yet (`rapport reward-model train`): replying with one sample",
            err=True,
        )
    return ranker


def policy_source(config: Config, store: Store, *, pinned: bool, seed: int | None = None):
    """What a running bot serves: a pinned ``--model``, else the deployed version,
    followed between replies (hot reload; see :mod:`bot.loop.registry`)."""
    from bot.loop.registry import DeployedPolicy

    ranker = best_of_ranker(config)
    if pinned:
        policy = load_policy(config, store, seed, ranker)
        return lambda: policy
    return DeployedPolicy(
        store, config, seed=seed, ranker=ranker, report=lambda m: click.echo(m, err=True)
    )


@cli.command()
@click.option(
    "--model", "model", help="Serve this folder or version (default: the deployed version)."
)
@click.option("--seed", type=int, help="Seed the sampler, for reproducible replies.")
@click.option("--user", default=None, help="Your name in the log (stored only as a keyed hash).")
@click.pass_obj
def chat(config: Config, model: str | None, seed: int | None, user: str | None) -> None:
    """Chat in the terminal; /up and /down rate replies, /help lists commands."""
    from bot.safety import SafetyFilter
    from bot.session import Session
    from bot.terminal import run_terminal

    if model is not None:
        config.model.path = model
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with open_store(config) as store:
        if sys.stdin.isatty():
            click.echo("loading the model...", err=True)
        safety = SafetyFilter.from_config(config.safety)
        session = Session(
            store,
            policy_source(config, store, pinned=model is not None, seed=seed),
            platform="terminal",
            platform_user_id=user or getpass.getuser(),
            channel="terminal",
            safety=safety,
        )
        run_terminal(session)


@cli.command("discord")
@click.option(
    "--model", "model", help="Serve this folder or version (default: the deployed version)."
)
@click.pass_obj
def discord_command(config: Config, model: str | None) -> None:
    """Run the bot on Discord (token from DISCORD_TOKEN or discord.token_file)."""
    from bot.discord_bot import read_token, run_discord
    from bot.safety import SafetyFilter

    if model is not None:
        config.model.path = model
    read_token(config.discord)  # fail fast, before loading the model
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with open_store(config) as store:
        safety = SafetyFilter.from_config(config.safety)
        source = policy_source(config, store, pinned=model is not None)
        click.echo(f"serving {source().version} on Discord; Ctrl-C stops", err=True)
        run_discord(store, source, config.discord, safety)


@cli.group("import")
def import_() -> None:
    """Import human conversations (corpora, JSONL) into the store."""


def _import(config: Config, platform: str, conversations, total: int | None = None) -> int:

    def batched(items, size):  # itertools.batched is Python 3.12+
        iterator = iter(items)
        while chunk := list(islice(iterator, size)):
            yield chunk

    added = 0
    on_interrupt("every 500 conversations imported are saved; the same command skips them")
    with (
        open_store(config) as store,
        progress(total or 0, f"importing {platform}") as bar,
    ):
        for chunk in batched(conversations, 500):
            added += store.import_conversations(platform, chunk)
            bar.update(len(chunk))
    return added


@import_.command("chitchat")
@click.pass_obj
def import_chitchat(config: Config) -> None:
    """The chitchat-dataset corpus: 7,168 human conversations (re-import adds nothing)."""

    conversations = list(chitchat_conversations())
    added = _import(config, CHITCHAT_PLATFORM, conversations, len(conversations))
    skipped = len(conversations) - added
    click.echo(f"imported {added:,} conversations ({skipped:,} already there)")


@import_.command("jsonl")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--platform", default="jsonl", show_default=True, help="Label of the source.")
@click.pass_obj
def import_jsonl(config: Config, path: str, platform: str) -> None:
    """Conversations from a JSONL file, one per line (format: README, bot/corpora.py)."""

    bad: list[BadLine] = []
    added = _import(config, platform, jsonl_conversations(Path(path), bad))
    for line in bad:
        click.echo(f"{path}:{line.number}: skipped: {line.reason}", err=True)
    click.echo(f"imported {added:,} conversations; {plural(len(bad), 'bad line')} skipped")


@cli.command()
@click.option(
    "--reward-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Reward model folder for learned_reward (default: the newest trained, if any).",
)
@click.pass_obj
def score(config: Config, reward_model: str | None) -> None:
    """Score every unscored bot turn with each reward signal, then the combined reward."""

    from rewards.score import learned_signal

    learned = learned_signal(Path(reward_model) if reward_model else None)
    on_interrupt("every scored batch is saved; `rapport score` goes on from there")
    with open_store(config) as store:
        summary = _score(store, config, learned)
    click.echo(
        f"scored {summary.bot_turns:,} bot turns in {summary.conversations:,} conversations; "
        f"combined reward updated for {summary.combined:,}"
    )


def _score(store: Store, config: Config, learned=None):
    """``rewards.score.score_store`` with a bar counting bot turns."""
    from rewards.score import score_store, scorer_version

    pending = store.conversations_to_score(scorer_version(learned))
    with progress(store.bot_turn_count(pending), "scoring bot turns") as bar:
        return score_store(store, config, progress=bar.update, learned=learned)


def _train(store: Store, prior_path, spec: str, config: Config, train_config, **resuming):
    """``learner.pipeline.run_training`` with a bar of steps (loss and speed beside it)."""
    from learner.pipeline import prior_version, run_training

    steps = resuming.get("resume_steps") if resuming.get("resume") else None
    with progress(
        steps or train_config.steps, f"training {train_config.algo}", item_show_func=_show_metrics
    ) as bar:

        def on_step(step: int, metrics: dict) -> None:
            bar.current_item = metrics
            bar.update(step - bar.pos)

        return run_training(
            store,
            prior_path,
            prior_version(spec),
            config.model.system_prompt,
            train_config,
            progress=on_step,
            **resuming,
        )


def _learner_help(name: str) -> str:
    """A train flag's help: the TrainConfig field's own text and default (one place)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f"{field.metadata['help']} [default: {field.default}]"


@cli.command()
@click.option(
    "--algo",
    default="psi",
    show_default=True,
    help="kl_q | psi | g | batch_q | bc (ours) | kto | dpo | sft (trl).",
)
@click.option("--reward", default=None, help=_learner_help("reward"))
@click.option("--steps", type=int, default=None, help=_learner_help("steps"))
@click.option("--batch-size", type=int, default=None, help=_learner_help("batch_size"))
@click.option("--max-tokens", type=int, default=None, help=_learner_help("max_tokens"))
@click.option("--lr", type=float, default=None, help=_learner_help("lr"))
@click.option("--gamma", type=float, default=None, help=_learner_help("gamma"))
@click.option("--reward-scale", type=float, default=None, help=_learner_help("reward_scale"))
@click.option("--reward-clip", type=float, default=None, help=_learner_help("reward_clip"))
@click.option("--td-lambda", type=float, default=None, help=_learner_help("td_lambda"))
@click.option("--tau", type=float, default=None, help=_learner_help("tau"))
@click.option("--mc-samples", type=int, default=None, help=_learner_help("mc_samples"))
@click.option("--huber-delta", type=float, default=None, help=_learner_help("huber_delta"))
@click.option("--seed", type=int, default=None, help=_learner_help("seed"))
@click.option("--beta", type=float, default=None, help=_learner_help("beta"))
@click.option("--pairs-from", default=None, help=_learner_help("pairs_from"))
@click.option("--platform", default=None, help=_learner_help("platform"))
@click.option("--since", default=None, metavar="DATE", help=_learner_help("since"))
@click.option("--until", default=None, metavar="DATE", help=_learner_help("until"))
@click.option(
    "--max-conversations", type=int, default=None, help=_learner_help("max_conversations")
)
@click.option("--min-reward", type=float, default=None, help=_learner_help("min_reward"))
@click.option("--kl-budget", type=float, default=None, help=_learner_help("kl_budget"))
@click.option("--log-every", type=int, default=None, help=_learner_help("log_every"))
@click.option("--checkpoint-every", type=int, default=None, help=_learner_help("checkpoint_every"))
@click.option("--model", "model", default=None, help="Prior: folder or version (default: config).")
@click.option("--resume", default=None, metavar="RUN", help="Resume the named run.")
@click.pass_obj
def train(config: Config, algo: str, model: str | None, resume: str | None, **options) -> None:
    """Retrain the bot offline from the logs: KL-control, or trl's kto/dpo/sft as peers."""
    train_config = TrainConfig(algo=algo)
    resume_steps = options["steps"]
    for key, value in options.items():
        if value is not None:
            setattr(train_config, key, value)
    train_config.validate()
    spec = model if model is not None else config.model.path
    if algo in TOKEN_LEVEL:
        on_interrupt(
            f"the run keeps its last checkpoint (every {train_config.checkpoint_every} steps); "
            "`rapport runs` names it, `rapport train --resume RUN` goes on"
        )
    else:
        on_interrupt(f"{algo} (trl) runs do not resume; nothing was registered")
    with open_store(config) as store:
        from bot.policy import resolve_model_path

        registered = {m["version"]: m["path"] for m in store.models()}
        prior_path = resolve_model_path(spec, registered)
        version, folder, metrics = _train(
            store, prior_path, spec, config, train_config, resume=resume, resume_steps=resume_steps
        )
    click.echo(f"trained {version}: {folder}")
    if metrics.get("stopped") == "kl_budget":
        click.echo(
            f"stopped at step {metrics['step']} of {train_config.steps}: KL to the prior "
            f"reached the budget of {train_config.kl_budget:g} nats/token"
        )
    click.echo(
        "final: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )


def _show_metrics(metrics: dict | None) -> str:
    if not metrics:
        return ""
    loss = metrics.get("loss", float("nan"))
    speed = f", {metrics['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in metrics else ""
    return f"loss {loss:.4f}{speed}"


def _served(config: Config, store: Store, spec: str):
    """(model, tokenizer, version) of a model spec for batched self-play: served in bf16
    where the chat serves int8, because the int8 weight-only kernel is built for one-row
    decoding and is 1.6x slower than bf16 on batched generation (measured here)."""
    from bot.policy import load_model, prepare_for_serving, resolve_model_path

    registered = {m["version"]: m["path"] for m in store.models()}
    model, tokenizer = load_model(resolve_model_path(spec, registered))
    precision = "bf16" if config.model.serve_precision == "int8" else config.model.serve_precision
    return prepare_for_serving(model, precision), tokenizer, spec or "prior"


@cli.command("eval")
@click.argument("version", required=False, default="")
@click.option("--vs", "others", multiple=True, help="Another version to compare; repeatable.")
@click.option("--n", "n", type=int, default=20, show_default=True, help="Conversations.")
@click.option("--turns", type=int, default=6, show_default=True, help="Bot turns each.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--user-model", default="", help="Simulated user's model (default: the prior).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--best-of",
    type=int,
    default=0,
    help="Also play the first version best-of-N, ranked by the newest reward model "
    "(a row 'VERSION+best-of-N'; generation.best_of_caution applies).",
)
@click.pass_obj
def eval_command(
    config: Config, version: str, others, n, turns, seed, user_model, out, force, best_of
) -> None:
    """Compare model versions on the same seeded simulated users (default: the prior)."""
    from bot.policy import Settings
    from learner.evaluation import evaluate, format_table, write_json
    from learner.simulate import Rerank
    from rewards.rank import RewardRanker

    out_path = new_file(out, force) if out else None  # refused before the long work
    rerank = {}
    if best_of > 1:
        ranker = RewardRanker.latest(rapport_home() / "reward_models")
        if ranker is None:
            raise click.UsageError(
                "--best-of ranks replies with a reward model: train one first "
                "(`rapport reward-model train`)"
            )
    on_interrupt("an evaluation keeps nothing; the same command starts it over")

    with open_store(config) as store:
        models = {}
        for spec in (version, *others):
            model, tokenizer, name = _served(config, store, spec)
            models[name] = (model, tokenizer)
            if best_of > 1 and not rerank:
                models[f"{name}+best-of-{best_of}"] = (model, tokenizer)
                rerank[f"{name}+best-of-{best_of}"] = Rerank(
                    best_of, ranker, config.generation.best_of_caution
                )
        # the prior scores fluency and KL in the policies' precision (see learner.evaluation)
        prior, _, _ = _served(config, store, config.model.path)
        user = _served(config, store, user_model)[0] if user_model else prior
        settings = Settings.from_config(config.generation)
        with progress(2 * len(models), "evaluating (self-play, then scoring, per model)") as bar:
            results = evaluate(
                models,
                prior,
                user,
                tokenizer,
                n=n,
                turns=turns,
                seed=seed,
                system_prompt=config.model.system_prompt,
                settings=settings,
                weights=dataclasses.asdict(config.weights),
                progress=bar.update,
                rerank=rerank,
            )
    click.echo(format_table(results))
    for name, conversations in results["samples"].items():
        click.echo(f"\n[{name}] sample conversation:")
        for turn in conversations[0] if conversations else []:
            click.echo(f"  {turn['role']:>4}: {' '.join(turn['text'].split())[:200]}")
    if out_path:
        write_json(results, out_path)
        click.echo(f"wrote {out_path}")


@cli.command()
@click.option(
    "--model", "model", default="", help="Version or folder playing the bot (default: deployed)."
)
@click.option("--n", "n", type=int, default=100, show_default=True, help="Conversations.")
@click.option("--turns", type=int, default=6, show_default=True, help="Bot turns each.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--batch", type=int, default=16, show_default=True, help="Conversations per committed batch."
)
@click.pass_obj
def simulate(config: Config, model: str, n: int, turns: int, seed: int, batch: int) -> None:
    """Self-play with simulated users, written to the store as platform "simulated".

    Batches are committed one by one, so a kill loses at most the batch in flight, and a
    re-run with the same arguments skips the batches already stored."""
    from bot.policy import DEFAULT_MODEL_NAME, Settings
    from bot.safety import SafetyFilter
    from learner.simulate import simulate_into_store

    if n < 1 or batch < 1:
        raise click.UsageError("--n and --batch must be at least 1")
    on_interrupt("every finished batch is saved; the same command goes on from there")
    with open_store(config) as store:
        # the bot is what users meet: --model, else the deployed version, else the config's
        spec = model or store.deployed_version() or config.model.path
        policy, tokenizer, _ = _served(config, store, spec)
        user, _, _ = _served(config, store, config.model.path)
        version = spec or DEFAULT_MODEL_NAME
        with progress(n, f"simulating with {version}") as bar:
            added = simulate_into_store(
                store,
                policy,
                user,
                tokenizer,
                version=version,
                n=n,
                turns=turns,
                seed=seed,
                batch=batch,
                system_prompt=config.model.system_prompt,
                settings=Settings.from_config(config.generation),
                progress=bar.update,
                safety=SafetyFilter.from_config(config.safety),
            )
    click.echo(f"simulated {added} conversations with {version}; run `rapport score` next")


@cli.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List model versions with their key eval numbers (* = served: the deployed version,
    or the base model until the first deploy)."""
    if ctx.invoked_subcommand is not None:
        return
    from bot.loop.registry import serving_version

    with open_store(ctx.obj) as store:
        rows = store.models()
        checks = {c["version"]: c for c in store.gate_checks()}  # the latest per version
        serving = serving_version(store, ctx.obj)
    if serving not in {m["version"] for m in rows}:  # the base, before any deploy
        rows = [
            {"version": serving, "algorithm": "base", "parent": None, "created": "-"},
            *rows,
        ]
    click.echo(
        f"  {'version':<28} {'algorithm':<9} {'parent':<22} {'created':<20} {'gate':<7} "
        f"{'reward':>7} {'kl':>6} {'dist-2':>6} {'q-rate':>6}"
    )
    for m in rows:
        check = checks.get(m["version"])
        gate, numbers = "-", "      -" + "      -" * 3
        if check:
            gate = "forced" if check["forced"] else ("passed" if check["passed"] else "refused")
            e = check["verdict"]["eval"][m["version"]]
            numbers = (
                f"{e['combined']['value']:>7.3f} {e['kl_to_prior']['value']:>6.3f} "
                f"{e['distinct_2']['value']:>6.3f} {e['bot_question']['value']:>6.2f}"
            )
        mark = "*" if m["version"] == serving else " "
        click.echo(
            f"{mark} {m['version']:<28} {m['algorithm']:<9} {m['parent'] or '-':<22} "
            f"{m['created'][:19]:<20} {gate:<7} {numbers}"
        )


@models.command("log")
@click.pass_obj
def models_log(config: Config) -> None:
    """Every switch of the deployed version: when, what, from which, who, why."""
    with open_store(config) as store:
        rows = store.deployments()
    if not rows:
        click.echo("nothing deployed yet: `rapport deploy VERSION`")
    for d in rows:
        forced = " FORCED" if d["forced"] else ""
        click.echo(
            f"{d['at'][:19]}  {d['action']:<8} {d['version']} (was {d['previous'] or '-'}) "
            f"by {d['who']}{forced}{': ' + d['why'] if d['why'] else ''}"
        )


@models.command("add")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--version", "version", required=True, help="Name of the new version.")
@click.option("--algorithm", default="external", show_default=True)
@click.option("--parent", default=None, help="The version it was trained from.")
@click.pass_obj
def models_add(config: Config, folder: str, version: str, algorithm: str, parent) -> None:
    """Register a model folder trained elsewhere (its checksum is taken now)."""

    path = Path(folder).resolve()
    check_folder(path, version)  # a refused folder leaves no row and its name free
    with open_store(config) as store:
        store.add_model(version, str(path), algorithm, parent=parent)
    click.echo(f"registered {version}; `rapport deploy {version}` gates and serves it")


@models.command("compare")
@click.argument("version")
@click.argument("other", required=False, default="")
@click.option("--n", "n", type=int, default=6, show_default=True, help="Held-out openers.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
def models_compare(config: Config, version: str, other: str, n: int, seed: int) -> None:
    """What VERSION learned: the same openers answered by it and OTHER (default: the
    served version), side by side with each reply's rewards."""
    from bot.loop.registry import serving_version
    from bot.policy import Settings
    from learner.evaluation import compare

    if n < 1:
        raise click.UsageError("--n must be at least 1")
    with open_store(config) as store:
        other = other or serving_version(store, config)
        models = {}
        for spec in (version, other):
            model, tokenizer, _ = _served(config, store, spec)
            models[spec] = (model, tokenizer)
        user, _, _ = _served(config, store, config.model.path)
        rows = compare(
            models,
            user,
            tokenizer,
            n=n,
            seed=seed,
            system_prompt=config.model.system_prompt,
            settings=Settings.from_config(config.generation),
            weights=dataclasses.asdict(config.weights),
        )
    for row in rows:
        click.echo(f"\nuser: {_one_line(row['opener'])}")
        for name, reply in row["replies"].items():
            click.echo(f"  {name}: {_one_line(reply['text'])}")
            answer = _one_line(reply["answer"], 60)
            click.echo(
                f"  {' ' * len(name)}  combined {reply['combined']:+.2f}, question "
                f"{reply.get('bot_question', 0):.0f}, the user answered: {answer}"
            )


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@models.command("remove")
@click.argument("version")
@click.pass_obj
def models_remove(config: Config, version: str) -> None:
    """Forget a version that was never deployed; its files stay (`rapport runs prune`)."""
    with open_store(config) as store:
        folder = store.remove_model(version)
    click.echo(f"removed {version}; its files stay in {folder}")


@cli.group(invoke_without_command=True)
@click.pass_context
def runs(ctx: click.Context) -> None:
    """Training runs under $RAPPORT_HOME/runs: state and size on disk."""
    if ctx.invoked_subcommand is not None:
        return
    found = _runs(ctx.obj)
    if not found:
        click.echo("no training runs yet: `rapport train` starts one")
        return
    click.echo(f"{'run':<32} {'state':<12} {'size':>9} {'checkpoint':>11}  version")
    for run in found:
        click.echo(
            f"{run.name:<32} {run.state:<12} {_size(run.bytes):>9} "
            f"{_size(run.checkpoint_bytes):>11}  {run.version or '-'}"
        )
    click.echo(f"total {_size(sum(r.bytes for r in found))}; `rapport runs prune` frees space")


@runs.command("prune")
@click.option("--resumable", is_flag=True, help="Also delete killed runs that could resume.")
@click.option("--dry-run", is_flag=True, help="Say what would be freed; delete nothing.")
@click.pass_obj
def runs_prune(config: Config, resumable: bool, dry_run: bool) -> None:
    """Delete checkpoints of registered runs and runs that served no version."""
    freed = prune(_runs(config), resumable=resumable, dry_run=dry_run)
    click.echo(f"{'would free' if dry_run else 'freed'} {_size(freed)}")


def _runs(config: Config):
    with open_store(config) as store:
        registered = {m["version"]: m["path"] for m in store.models()}
    return list_runs(rapport_home() / "runs", registered)


def plural(n: int, noun: str) -> str:
    """'1 bad line', '2 bad lines'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _size(n: float) -> str:
    """Bytes for people: 512 B, 2.2 GB (powers of 1000, as df -H)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _who(who: str | None) -> str:
    return who or getpass.getuser()


@cli.command()
@click.argument("version")
@click.option("--why", default="", help="Why, for the deployment log.")
@click.option("--who", default=None, help="Who (default: your login name).")
@click.option("--force", is_flag=True, help="Deploy even if the eval checks fail (logged).")
@click.pass_obj
def deploy(config: Config, version: str, why: str, who: str | None, force: bool) -> None:
    """Gate VERSION against the deployed one and switch running bots to it."""
    from bot.loop.registry import deploy as deploy_version

    with open_store(config) as store:
        verdict = deploy_version(
            store, config, version, who=_who(who), why=why, force=force, echo=click.echo
        )
    forced = " (FORCED past a failed gate)" if not verdict["passed"] else ""
    click.echo(f"deployed {version}{forced}; running bots switch before their next reply")


@cli.command()
@click.option("--why", default="", help="Why, for the deployment log.")
@click.option("--who", default=None, help="Who (default: your login name).")
@click.pass_obj
def rollback(config: Config, why: str, who: str | None) -> None:
    """Serve the previously deployed version again."""
    from bot.loop.registry import rollback as roll_back

    with open_store(config) as store:
        current, target = roll_back(store, config, who=_who(who), why=why)
    click.echo(f"rolled back from {current} to {target}")


@cli.command()
@click.option("--algo", default="psi", show_default=True, help="Learner (see `rapport train`).")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default 200).")
@click.option("--reward", default=None, help="Stored reward to learn from (default combined).")
@click.option("--why", default="", help="Why, for the deployment log.")
@click.option("--no-deploy", is_flag=True, help="Stop after the gate, whatever it says.")
@click.pass_obj
def retrain(config: Config, algo: str, steps, reward, why: str, no_deploy: bool) -> None:
    """The whole loop: score, snapshot + train, eval + gate, deploy if it passes."""
    from bot.loop.registry import deploy as deploy_version

    train_config = TrainConfig(algo=algo)
    for key, value in (("steps", steps), ("reward", reward)):
        if value is not None:
            setattr(train_config, key, value)
    train_config.validate()
    with open_store(config) as store:
        summary = _score(store, config)
        click.echo(f"1/3 scored {summary.bot_turns:,} new bot turns")
        from bot.policy import resolve_model_path

        registered = {m["version"]: m["path"] for m in store.models()}
        spec = config.model.path
        prior_path = resolve_model_path(spec, registered)
        version, folder, metrics = _train(store, prior_path, spec, config, train_config)
        click.echo(f"2/3 trained {version} ({_show_metrics(metrics)})")
        verdict = deploy_version(
            store,
            config,
            version,
            who=getpass.getuser(),
            why=why or f"rapport retrain --algo {algo}",
            dry_run=no_deploy,
            echo=click.echo,
        )
    if no_deploy:
        outcome = "passed" if verdict["passed"] else "failed"
        click.echo(f"3/3 {version} {outcome} the gate; not deployed (--no-deploy)")
    else:
        click.echo(f"3/3 deployed {version}; running bots switch before their next reply")


@cli.group("reward-model")
def reward_model() -> None:
    """A reward model learned from the votes (learned_reward in `rapport score`)."""


@reward_model.command("train")
@click.option("--members", type=int, default=None, help="Ensemble size N (default 3).")
@click.option("--steps", type=int, default=None, help="Steps per member (default 100).")
@click.option("--batch-size", type=int, default=None, help="Pairs per step (default 8).")
@click.option("--lr", type=float, default=None, help="Learning rate (default 5e-5).")
@click.option("--misclick", type=float, default=None, help="Random-vote rate (default 0.1).")
@click.option("--seed", type=int, default=None, help="Seed (default 0).")
@click.option(
    "--target",
    type=click.Choice(["votes", "continue"]),
    default=None,
    help="votes (default: learned_reward) | continue: whether the user went on talking "
    "after a bot turn, from every ended conversation (learned_engagement).",
)
@click.option("--model", "model", default=None, help="Base: folder or version (default: config).")
@click.pass_obj
def reward_model_train(config: Config, model: str | None, **options) -> None:
    """Train an ensemble of Bradley-Terry reward models on pairs from the votes (or from
    whether users continued)."""
    from bot.policy import resolve_model_path
    from learner.reward_model import RewardModelConfig, train_reward_model

    rm_config = RewardModelConfig()
    for key, value in options.items():
        if value is not None:
            setattr(rm_config, key, value)
    with open_store(config) as store:
        registered = {m["version"]: m["path"] for m in store.models()}
        base = resolve_model_path(model if model is not None else config.model.path, registered)
        folder, info = train_reward_model(
            store, base, rm_config, progress=lambda line: click.echo(line, err=True)
        )
    members = ", ".join(f"{a:.2f}" for a in info["member_accuracy"])
    click.echo(f"trained reward model {folder}")
    click.echo(
        f"held-out pairs: {info['held_out_pairs']}; ranking accuracy {info['accuracy']:.2f} "
        f"(members: {members}); ensemble spread {info['spread']:.3f}"
    )
    positive = "continued" if rm_config.target == "continue" else "liked"
    click.echo(
        f"held-out AUC {info['auc']:.2f} (the base rate, {info['base_rate']:.0%} {positive}, "
        "scores 0.50)"
    )
    signal = "learned_engagement" if rm_config.target == "continue" else "learned_reward"
    click.echo(f"`rapport score` now scores {signal} with it")


@cli.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    required=True,
    help="kto | dpo | sft (trl's datasets) | jsonl | parquet (the log, votes and rewards).",
)
@click.option(
    "--pairs-from", default="votes", show_default=True, help="kto, dpo: votes | combined | retries."
)
@click.option("--platform", default="", help="Only this platform's conversations.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.pass_obj
def export(config: Config, out: str, fmt: str, pairs_from: str, platform: str, force) -> None:
    """Write the logs to OUT in a format trl and other tools read (README: export)."""
    from learner.export import export as write_export

    path = new_file(out, force)
    on_interrupt(f"{path} is as it was (an export is written whole, then renamed)")
    with open_store(config) as store:
        count = write_export(
            store,
            fmt,
            path,
            config.model.system_prompt,
            pairs_from=pairs_from,
            platform=platform,
        )
    click.echo(f"wrote {count:,} {fmt} rows to {out}")


@cli.group()
def report() -> None:
    """Write HTML reports with figures."""


@report.command("eval")
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder (default: $RAPPORT_HOME/reports/eval).",
)
@click.pass_obj
def report_eval(config: Config, results: str, out: str | None) -> None:
    """The JSON of `rapport eval --out` as bar charts with intervals and training curves."""
    from learner.report import write_eval_report

    try:
        data = json.loads(Path(results).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RapportError(f"{results} is not the JSON of `rapport eval --out`: {e}") from None
    with open_store(config) as store:
        paths = {m["version"]: Path(m["path"]) for m in store.models()}
    runs = {name: paths[name].parent / "metrics.jsonl" for name in data if name in paths}
    folder = Path(out) if out else rapport_home() / "reports" / "eval"
    click.echo(f"wrote {write_eval_report(data, runs, folder)}")


@report.command("rewards")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the report (default: $RAPPORT_HOME/reports/rewards).",
)
@click.pass_obj
def report_rewards(config: Config, out: str | None) -> None:
    """Distributions, correlations, agreement with votes, ratings, examples per signal."""

    from rewards.report import ratings_summary, safety_summary, write_report

    folder = Path(out) if out else rapport_home() / "reports" / "rewards"
    with open_store(config) as store:
        index = write_report(store, folder)
        click.echo(f"ratings: {ratings_summary(store)}")
        click.echo(safety_summary(store))
    click.echo(f"wrote {index}")


@cli.group()
def db() -> None:
    """Inspect and back up the conversation database."""


@db.command("status")
@click.pass_obj
def db_status(config: Config) -> None:
    """Print the database path, schema version and row counts per table."""
    with open_store(config) as store:
        version, name = store.schema_version()
        click.echo(f"database: {store.path}")
        click.echo(f"schema version: {version} ({name})")
        for table, count in store.counts().items():
            click.echo(f"{table:<14} {count:>10,}")


@db.command("check")
@click.pass_obj
def db_check(config: Config) -> None:
    """Integrity, orphan rows, schema version and WAL size, in one verdict line (read-only;
    exit status 1 on a problem)."""
    path = config.database_path()
    if not Path(path).exists():
        raise RapportError(
            f"no database at {path} yet: `rapport chat` or `rapport import` makes one"
        )
    try:
        verdict = check(path).verdict()
    except sqlite3.DatabaseError as e:
        verdict = f"PROBLEM: {path} is not a readable database ({e}); restore a backup"
    click.echo(verdict)
    if verdict.startswith("PROBLEM"):
        sys.exit(1)


@db.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace DESTINATION if it exists.")
@click.pass_obj
def db_backup(config: Config, destination: str, force: bool) -> None:
    """Write a consistent copy of the database to DESTINATION (safe while bots run)."""
    path = new_file(destination, force)
    on_interrupt(f"{path} is as it was (a backup is written whole, then renamed)")
    with open_store(config) as store:
        store.backup(path, replace=force)
    click.echo(f"backed up to {path}")


# What a command that is interrupted (Ctrl-C) has kept, said on the way out.
_ON_INTERRUPT: dict[str, str] = {}


def on_interrupt(message: str) -> None:
    """Say ``message`` if this command is interrupted: what is saved, how to go on."""
    _ON_INTERRUPT["message"] = message


def main(argv: list[str] | None = None) -> None:
    # torch's own deprecation inside its export machinery (when the sentence embedder is
    # traced on the first `rapport score`): nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    _ON_INTERRUPT.clear()
    try:
        code = cli.main(args=argv, prog_name="rapport", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        said = _ON_INTERRUPT.get("message")
        click.echo(f"interrupted: {said}" if said else "aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except RapportError as e:
        click.echo(f"rapport: error: {e}", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
