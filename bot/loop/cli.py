"""The ``rapport`` command: one entry point, one small function a subcommand. This module
has the group, the serving commands (``chat``, ``discord``), ``import``, ``score``,
``deploy``, ``rollback`` and ``retrain``; the learning commands are in
:mod:`bot.loop.cli_learn`, the bookkeeping ones (``models``, ``runs``, ``export``,
``report``, ``db``) in :mod:`bot.loop.cli_records`, what they share in
:mod:`bot.loop.cli_common`.

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

import getpass
import logging
import os
import sys
import warnings
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bot import processes
from bot.config import Config, load_config, rapport_home
from bot.corpora import CHITCHAT_PLATFORM, BadLine, chitchat_conversations, jsonl_conversations
from bot.errors import RapportError
from bot.loop.cli_common import ON_INTERRUPT, login_name, on_interrupt, open_store, plural
from bot.loop.cli_learn import (
    eval_command,
    reward_model,
    show_metrics,
    simulate,
    train,
    train_with_progress,
)
from bot.loop.cli_records import db, export, models, report, runs
from bot.progress import progress
from bot.store import Store
from learner.config import TrainConfig

if TYPE_CHECKING:
    from bot.policy import Policy


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


def _import(
    config: Config, platform: str, conversations, total: int, bad: list[BadLine] | None = None
) -> int:
    """Store ``conversations`` 500 at a time; the bar counts them and the ``bad`` lines
    skipped on the way (out of ``total``)."""

    def batched(items, size):  # itertools.batched is Python 3.12+
        iterator = iter(items)
        while chunk := list(islice(iterator, size)):
            yield chunk

    added = skipped = 0
    on_interrupt("every 500 conversations imported are saved; the same command skips them")
    with (
        open_store(config) as store,
        progress(total, f"importing {platform}") as bar,
    ):
        for chunk in batched(conversations, 500):
            added += store.import_conversations(platform, chunk)
            newly_bad = len(bad or ()) - skipped
            skipped += newly_bad
            bar.update(len(chunk) + newly_bad)
        bar.update(len(bad or ()) - skipped)  # bad lines after the last conversation
    return added


def _count_lines(path: Path) -> int:
    """Lines that are not blank: the conversations a JSONL file holds, good and bad."""
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise RapportError(f"cannot read {path}: {e.strerror}") from None


@import_.command("chitchat")
@click.pass_obj
def import_chitchat(config: Config) -> None:
    """The chitchat-dataset corpus: 7,168 human conversations (re-import adds nothing)."""

    conversations = list(chitchat_conversations())
    added = _import(config, CHITCHAT_PLATFORM, conversations, len(conversations))
    skipped = len(conversations) - added
    click.echo(f"imported {plural(added, 'conversation')} ({skipped:,} already there)")


@import_.command("jsonl")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--platform", default="jsonl", show_default=True, help="Label of the source.")
@click.pass_obj
def import_jsonl(config: Config, path: str, platform: str) -> None:
    """Conversations from a JSONL file, one per line (format: README, bot/corpora.py)."""

    bad: list[BadLine] = []
    lines = _count_lines(Path(path))
    added = _import(config, platform, jsonl_conversations(Path(path), bad), lines, bad)
    for line in bad:
        click.echo(f"{path}:{line.number}: skipped: {line.reason}", err=True)
    click.echo(f"imported {plural(added, 'conversation')}; {plural(len(bad), 'bad line')} skipped")


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
        f"scored {plural(summary.bot_turns, 'bot turn')} in "
        f"{plural(summary.conversations, 'conversation')}; "
        f"combined reward updated for {summary.combined:,}"
    )


def _score(store: Store, config: Config, learned=None):
    """``rewards.score.score_store`` with a bar counting bot turns."""
    from rewards.score import score_store, scorer_version

    with progress(store.turns_to_score(scorer_version(learned)), "scoring bot turns") as bar:
        return score_store(store, config, progress=bar.update, learned=learned)


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
            store, config, version, who=login_name(who), why=why, force=force, echo=click.echo
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
        current, target = roll_back(store, config, who=login_name(who), why=why)
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
        click.echo(f"1/3 scored {plural(summary.bot_turns, 'new bot turn')}")
        from bot.policy import resolve_model_path

        registered = {m["version"]: m["path"] for m in store.models()}
        spec = config.model.path
        prior_path = resolve_model_path(spec, registered)
        version, folder, metrics = train_with_progress(
            store, prior_path, spec, config, train_config
        )
        click.echo(f"2/3 trained {version} ({show_metrics(metrics)})")
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


for command in (train, eval_command, simulate, reward_model, models, runs, export, report, db):
    cli.add_command(command)


def quiet_libraries() -> None:
    """Keep the libraries' own chatter off a user's terminal: their deprecation warnings
    (torch.export's LeafSpec on the first `score`, transformers' renamed arguments in
    `reward-model train`), their tqdm bars (loading weights, GGUF conversion, dataset
    maps), which would interleave with ours, and transformers' load reports. A user who
    wants any of it back sets the variable (TQDM_DISABLE=0, TRANSFORMERS_VERBOSITY=info)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name, value in (
        ("TQDM_DISABLE", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    ON_INTERRUPT.clear()
    try:
        code = cli.main(args=argv, prog_name="rapport", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        said = ON_INTERRUPT.get("message")
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
