"""The bookkeeping commands of ``rapport``: ``models`` (list, log, add, compare, remove),
``runs`` (list, prune), ``export``, ``report`` and ``db`` (status, check, backup).

Registered on the ``rapport`` group by :mod:`bot.loop.cli`; like it, a command imports the
torch-loading modules it runs inside its body (start-up time; tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

import click

from bot.check import check
from bot.config import Config, rapport_home
from bot.errors import RapportError
from bot.files import new_file
from bot.loop.cli_common import on_interrupt, open_store, served, size
from bot.model_files import check_folder
from learner.runs import list_runs, prune


@click.group(invoke_without_command=True)
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
            model, tokenizer, _ = served(config, store, spec)
            models[spec] = (model, tokenizer)
        user, _, _ = served(config, store, config.model.path)
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


@click.group(invoke_without_command=True)
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
            f"{run.name:<32} {run.state:<12} {size(run.bytes):>9} "
            f"{size(run.checkpoint_bytes):>11}  {run.version or '-'}"
        )
    click.echo(f"total {size(sum(r.bytes for r in found))}; `rapport runs prune` frees space")


@runs.command("prune")
@click.option("--resumable", is_flag=True, help="Also delete killed runs that could resume.")
@click.option("--dry-run", is_flag=True, help="Say what would be freed; delete nothing.")
@click.pass_obj
def runs_prune(config: Config, resumable: bool, dry_run: bool) -> None:
    """Delete checkpoints of registered runs and runs that served no version."""
    freed = prune(_runs(config), resumable=resumable, dry_run=dry_run)
    click.echo(f"{'would free' if dry_run else 'freed'} {size(freed)}")


def _runs(config: Config):
    with open_store(config) as store:
        registered = {m["version"]: m["path"] for m in store.models()}
    return list_runs(rapport_home() / "runs", registered)


@click.command()
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


@click.group()
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


@click.group()
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
