"""``rapport train`` end to end: snapshot -> dataset -> train -> model folder -> registry.

Data preparation is its own step (:func:`prepare_dataset`), cached by dataset id under
``$RAPPORT_HOME/datasets``: the snapshot, the tokenised windows and the prior's cached
log-probabilities are built once and reused by every run on the same data.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from pickle import UnpicklingError

from transformers import AutoTokenizer

from bot.config import rapport_home
from bot.policy import DEFAULT_MODEL_NAME, load_model
from bot.progress import progress
from bot.store import Store
from bot.store_data import Selection
from learner import runs as runs_on_disk
from learner.config import TRL, TrainConfig
from learner.data import (
    Dataset,
    add_prior_logprobs,
    build_dataset,
    normalise_rewards,
    window_key,
)
from learner.train import TrainingError, free_memory_ok, prepare_models, train


def prepare_dataset(
    store: Store, prior_path: Path, system_prompt: str, config: TrainConfig
) -> Dataset:
    """Snapshot the store, tokenise the scored conversations, cache prior log-probs."""
    with tempfile.TemporaryDirectory() as tmp:
        snapshot = Store(store.snapshot(str(Path(tmp) / "snapshot.db")), key=b"\0" * 32)
        conversations = snapshot.training_conversations(config.reward, config.selection())
        snapshot.close()
    if not conversations:
        chosen = config.selection() != Selection()
        raise TrainingError(
            f"no conversations scored with {config.reward!r} to learn from"
            + (
                " among those chosen (--platform, --since, --until)"
                if chosen
                else ": import or chat, then run `rapport score`"
            )
        )
    reward_stats = normalise_rewards(conversations, config.reward_clip)
    prior, tokenizer = load_model(prior_path)
    dataset = build_dataset(
        conversations,
        tokenizer,
        system_prompt,
        config.max_tokens,
        config.val_fraction,
        source=str(store.path),
    )
    folder = rapport_home() / "datasets" / f"{dataset.meta['id']}-{_prior_key(prior_path)}"
    if (folder / "windows.pt").exists():
        return Dataset.load(folder)
    windows = len(dataset.train) + len(dataset.val)
    known = prepared_windows(folder.parent, _prior_key(prior_path))
    with progress(windows, "preparing data (the prior's log-probabilities, once)") as bar:
        add_prior_logprobs(dataset, prior, progress=bar.update, known=known)
    dataset.meta["prior"] = str(prior_path)
    dataset.meta["folder"] = str(folder)
    dataset.meta["reward"] = config.reward
    dataset.meta["reward_stats"] = reward_stats
    dataset.save(folder)
    return dataset


def prepared_windows(datasets: Path, prior_key: str) -> dict:
    """{window_key: window} of every dataset already prepared with this prior: the same
    logs scored with another reward give the same windows, whose prior statistics do not
    depend on the reward (so a second reward's preparation costs no prior forward). A
    damaged dataset is skipped (it is rebuilt when its own reward is trained)."""
    known = {}
    for path in sorted(datasets.glob(f"*-{prior_key}/windows.pt")):
        try:
            prepared = Dataset.load(path.parent)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError, UnpicklingError):
            continue
        if prepared.meta.get("prior_logprobs"):
            known.update((window_key(w), w) for w in prepared.train + prepared.val)
    return known


def _prior_key(prior_path: Path) -> str:
    return hashlib.sha256(str(Path(prior_path).resolve()).encode()).hexdigest()[:8]


def run_training(
    store: Store,
    prior_path: Path,
    prior_version: str,
    system_prompt: str,
    config: TrainConfig,
    *,
    resume: str | None = None,
    resume_steps: int | None = None,
    progress: Callable[[int, dict], None] | None = None,
    observe: Callable | None = None,
) -> tuple[str, Path, dict]:
    """Train and register a new (not deployed) model version; return (version, folder,
    final metrics). Resuming uses the run's own config and prepared data (the logs may
    have grown since); ``resume_steps`` extends it."""
    config.validate()
    runs = rapport_home() / "runs"
    name = resume or f"{config.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = runs / name
    if config.algo in TRL:
        if resume:
            raise TrainingError(
                f"--resume continues token-level runs; start a new {config.algo} run"
            )
        return _run_trl(store, prior_path, prior_version, system_prompt, config, run_dir, progress)
    if resume:
        if not (run_dir / "train_config.json").exists():
            raise TrainingError(f"no run named {resume!r} in {runs}")
        if (run_dir / "model" / "training.json").exists():
            raise TrainingError(
                f"run {resume!r} finished and registered version {resume}; "
                "start a new run to train further"
            )
        config = TrainConfig.from_json(run_dir / "train_config.json")
        config.steps = resume_steps or config.steps
        try:
            dataset = Dataset.load(Path((run_dir / "dataset.txt").read_text().strip()))
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainingError(
                f"the prepared data of run {resume!r} is missing or damaged "
                f"({type(e).__name__}); start a new run"
            ) from None
        prior_path = Path(dataset.meta["prior"])  # the run's own prior, whatever --model says
    else:
        dataset = prepare_dataset(store, prior_path, system_prompt, config)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "dataset.txt").write_text(dataset.meta["folder"])
    models = prepare_models(prior_path, config)
    free_memory_ok(sum(p.numel() for p in models.q.parameters()))
    run_id = store.start_training_run(config.algo, json.loads(config.to_json()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(prior_path)  # the weights are loaded once, above
        with runs_on_disk.hold(run_dir):  # a second process refuses the run; prune skips it
            metrics = train(
                config,
                dataset,
                models,
                run_dir,
                pad_id=tokenizer.pad_token_id or 0,
                resume=bool(resume),
                progress=progress,
                observe=observe,
            )
    except BaseException as e:
        store.finish_training_run(run_id, "failed", {"error": str(e)[:500]})
        raise
    folder = run_dir / "model"
    save_trained_model(folder, models.q, tokenizer, config, dataset.meta, metrics, prior_path)
    registered = _register(
        store, name, folder, config, prior_version, run_id, metrics, dataset.meta
    )
    runs_on_disk.drop_checkpoint(run_dir)  # registered: resuming is neither possible nor needed
    return registered


def _run_trl(store, prior_path, prior_version, system_prompt, config, run_dir, progress):
    """kto, dpo or sft with trl (learner/trl_train.py), saved and registered alike."""
    from learner.trl_train import run_trl_training  # trl loads only for kto, dpo, sft

    run_id = store.start_training_run(config.algo, json.loads(config.to_json()))
    try:
        model, tokenizer, metrics, meta = run_trl_training(
            store, prior_path, system_prompt, config, run_dir, progress
        )
    except BaseException as e:
        store.finish_training_run(run_id, "failed", {"error": str(e)[:500]})
        raise
    folder = run_dir / "model"
    save_trained_model(folder, model, tokenizer, config, meta, metrics, prior_path)
    return _register(store, run_dir.name, folder, config, prior_version, run_id, metrics, meta)


def _register(store, version, folder, config, prior_version, run_id, metrics, data_meta):
    """A new, undeployed version whose parent is the prior (with the data it was trained
    on); the run marked done."""
    store.add_model(
        version,
        str(folder),
        config.algo,
        parent=prior_version,
        training_run_id=run_id,
        metrics=metrics,
        data_snapshot=data_meta.get("folder") or data_meta.get("id"),
    )
    store.finish_training_run(run_id, "done", metrics)
    return version, folder, metrics


def save_trained_model(folder, q, tokenizer, config, data_meta, metrics, prior_path) -> None:
    """A model folder that ``bot.policy.load_model`` serves, with the config JSON, the
    data id and the final metrics beside the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    # Every algorithm serves softmax of the saved network's logits (learner.kl_control),
    # so a trained model is an ordinary model folder with no path back to its prior.
    q.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "train_config.json").write_text(config.to_json())
    info = {"dataset": data_meta, "metrics": metrics, "prior": str(prior_path)}
    (folder / "training.json").write_text(json.dumps(info, indent=2, sort_keys=True))


def prior_version(model_spec: str) -> str:
    return model_spec or DEFAULT_MODEL_NAME
