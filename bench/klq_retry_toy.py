"""kl_q vs psi on the retried-reply toy of tests/test_learner_train.py: where kl_q's KL ~5
comes from (bench/RESULTS.md, "kl_q and the retried reply").

Every fourth toy conversation carries a retried reply "why ..." (off the path, reward -1;
every kept reply 0; and a control with the retry scored 0). Every few steps it prints the
training metrics, the KL and top-4 of the first word after "hi", and over the training
states kl_q's V (max of l - b, less the prior's max) and the share of states whose most
likely token no window logs.

Run: ``.venv/bin/python bench/klq_retry_toy.py [kl_q,psi]`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import tests.test_learner_train as toy  # noqa: E402
from bot.policy import load_model  # noqa: E402
from bot.processes import keep_freed_memory  # noqa: E402
from learner.data import add_prior_logprobs, build_dataset, collate  # noqa: E402
from learner.train import prepare_models, train  # noqa: E402
from tests.tiny_models import save_tiny_model, save_tokenizer  # noqa: E402

STEPS = (5, 10, 20, 30, 50, 100)


def toy_prior(tmp: Path):
    """The tests' toy prior: the tiny model cloned on toy chats (bc, 250 steps)."""
    tiny = save_tiny_model(tmp / "tiny", save_tokenizer(tmp / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model, _ = load_model(tiny)
    dataset = toy.toy_dataset(tokenizer, model, lambda w: 0.0, seed=0, tail=toy.TAIL)
    config = toy.quick("bc", steps=250, lr=3e-3, min_reward=float("-inf"))
    models = prepare_models(tiny, config)
    train(config, dataset, models, tmp / "bc", pad_id=tokenizer.pad_token_id)
    folder = tmp / "prior"
    models.q.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def first_word(model, prior, tokenizer, logged: set[int]) -> str:
    lp = toy.first_token_logprobs(model, tokenizer)
    p = toy.first_token_logprobs(prior, tokenizer)
    kl = float((lp.exp() * (lp - p)).sum())
    top = torch.topk(lp, 4)
    shown = [
        (tokenizer.decode([int(i)]), round(float(v.exp()), 3), int(i) in logged)
        for v, i in zip(top.values, top.indices, strict=True)
    ]
    return f"KL(first word) {kl:.3f} top-4 (word, p, logged) {shown}"


@torch.no_grad()
def states(model, dataset, pad_id: int, logged: set[int]) -> str:
    batch = collate(dataset.train[:32], pad_id)
    mask = batch["mask"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[mask].float()
    v = logits.max(-1).values - batch["prior_lse"][mask] - batch["prior_max"][mask]
    unlogged = sum(int(a) not in logged for a in logits.argmax(-1)) / len(logits)
    return (
        f"V_klq mean {float(v.mean()):.2f} max {float(v.max()):.2f}; argmax unlogged {unlogged:.2f}"
    )


def main() -> None:
    keep_freed_memory()
    algos = sys.argv[1] if len(sys.argv) > 1 else "kl_q,psi"
    tmp = Path(tempfile.mkdtemp())
    prior_dir, tokenizer = toy_prior(tmp)
    prior, _ = load_model(prior_dir)
    for algo in algos.split(","):
        for reward in (-1.0, 0.0):
            logs = toy.with_retries(
                toy.toy_conversations(100, lambda w: 0.0, 1, toy.TAIL), "why", reward
            )
            dataset = build_dataset(logs, tokenizer, toy.SYS, 64, 0.0, "toy")
            add_prior_logprobs(dataset, prior)
            logged = {w.input_ids[t + 1] for w in dataset.train for t, m in enumerate(w.mask) if m}
            models = prepare_models(prior_dir, toy.quick(algo))
            for steps in STEPS:
                config = toy.quick(algo, steps=steps, checkpoint_every=5, log_every=5)
                metrics = train(
                    config,
                    dataset,
                    models,
                    tmp / f"{algo}{reward}",
                    pad_id=tokenizer.pad_token_id,
                    resume=steps > STEPS[0],
                )
                shown = {k: round(v, 3) for k, v in metrics.items() if isinstance(v, float)}
                print(algo, f"retry reward {reward}", f"step {steps}", shown, flush=True)
                print("   ", first_word(models.q, prior, tokenizer, logged), flush=True)
                print("   ", states(models.q, dataset, tokenizer.pad_token_id, logged), flush=True)


if __name__ == "__main__":
    main()
