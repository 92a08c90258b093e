"""The learning commands of ``rapport``: ``train``, ``eval``, ``simulate`` and
``reward-model train`` (``retrain`` runs them in a row, in :mod:`bot.loop.cli`).

Registered on the ``rapport`` group by :mod:`bot.loop.cli`; like it, a command imports the
torch-loading modules it runs inside its body (start-up time; tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses

import click

from bot.config import Config, rapport_home
from bot.files import new_file
from bot.loop.cli_common import on_interrupt, open_store, served
from bot.progress import progress
from bot.store import Store
from learner.config import TOKEN_LEVEL, TrainConfig


def train_with_progress(
    store: Store, prior_path, spec: str, config: Config, train_config, **resuming
):
    """``learner.pipeline.run_training`` with a bar of steps (loss and speed beside it)."""
    from learner.pipeline import prior_version, run_training

    steps = resuming.get("resume_steps") if resuming.get("resume") else None
    with progress(
        steps or train_config.steps, f"training {train_config.algo}", item_show_func=show_metrics
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


@click.command()
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
@click.option("--dueling/--no-dueling", default=None, help=_learner_help("dueling"))
@click.option("--value-lr", type=float, default=None, help=_learner_help("value_lr"))
@click.option("--value-fit", type=int, default=None, help=_learner_help("value_fit"))
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
        version, folder, metrics = train_with_progress(
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


def show_metrics(metrics: dict | None) -> str:
    if not metrics:
        return ""
    loss = metrics.get("loss", float("nan"))
    speed = f", {metrics['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in metrics else ""
    return f"loss {loss:.4f}{speed}"


@click.command("eval")
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
    from learner.evaluation import evaluate, format_table, progress_units, write_json
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
            model, tokenizer, name = served(config, store, spec)
            models[name] = (model, tokenizer)
            if best_of > 1 and not rerank:
                models[f"{name}+best-of-{best_of}"] = (model, tokenizer)
                rerank[f"{name}+best-of-{best_of}"] = Rerank(
                    best_of, ranker, config.generation.best_of_caution
                )
        # the prior scores fluency and KL in the policies' precision (see learner.evaluation)
        prior, _, _ = served(config, store, config.model.path)
        user = served(config, store, user_model)[0] if user_model else prior
        settings = Settings.from_config(config.generation)
        units = progress_units(len(models), turns)
        with progress(units, "evaluating (self-play rounds, then scoring, per model)") as bar:
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


@click.command()
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
        policy, tokenizer, _ = served(config, store, spec)
        user, _, _ = served(config, store, config.model.path)
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


@click.group("reward-model")
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
