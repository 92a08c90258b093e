"""Batched decoding: ``bot.policy.decode_rows`` against the library's ``generate``.

What self-play, ``rapport eval`` and the learning bench spend most of their time on: one
reply to each of ``--n`` held-out openers, sampled in groups of 64 left-padded rows
(``learner.simulate.generate_batch``). The peer is transformers' ``generate`` with the
same sampling (a logits processor that draws each row's token as ``decode_rows`` does,
keyed: paired sampling), which computes every row of a group until its longest reply
ends; ``decode_rows`` drops a row once it has ended. Both draw with the same keys, so
the replies must be the same, and the table says whether they are. In fp32, decode_rows
runs again with the other layout of the matmuls (``bot.policy.fp32_layout``: input-major
weights, or the transposed products of few rows), the peer with the input-major one.

Run: ``.venv/bin/python bench/decode_bench.py [--n 128 --max-new-tokens 64]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class KeyedSampling:
    """The peer's sampling: ``sample_rows`` with row keys inside a greedy ``generate``
    (only the sampled token is left finite, so the greedy pick is the sample)."""

    def __init__(self, settings, keys):
        import torch

        self.settings, self.keys, self.step = settings, torch.tensor(keys), 0

    def __call__(self, input_ids, scores):
        import torch

        from bot.policy import sample_rows

        tokens = sample_rows(scores, self.settings, keys=self.keys, step=self.step)
        self.step += 1
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(-1, tokens[:, None], 0.0)


def library_group(model, tokenizer, prompts, settings, keys):
    """One left-padded group through ``generate``: (replies, cut flags)."""
    import torch
    from transformers import LogitsProcessorList

    from bot.policy import clean_reply

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([KeyedSampling(settings, keys)]),
            repetition_penalty=settings.repetition_penalty,
            eos_token_id=list(tokenizer.all_special_ids),
            pad_token_id=pad,
        )
    stops = set(tokenizer.all_special_ids)
    cuts = [not any(int(t) in stops for t in row[width:]) for row in out]
    texts = [
        clean_reply(tokenizer.decode(row[width:], skip_special_tokens=True)) or "…" for row in out
    ]
    return texts, cuts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="held-out openers, one reply each")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the learning bench's")
    parser.add_argument(
        "--context-turns",
        type=int,
        default=1,
        help="turns in each prompt, the opener last (5: a third bot turn's context, as in "
        "self-play; the earlier turns are other openers)",
    )
    args = parser.parse_args()

    from dataclasses import replace

    from bot.config import Config
    from bot.policy import (
        Settings,
        batch_precision,
        default_model_dir,
        input_major,
        load_model,
        prepare_for_serving,
        row_key,
        transposed_products,
    )
    from bot.prompt import Turn, build_prompt
    from learner import simulate

    config = Config()
    precision = batch_precision()
    plain, tokenizer = load_model(default_model_dir())
    if precision == "fp32":  # the peer on input-major weights, decode_rows on both layouts
        layouts = {"input-major": input_major(copy.deepcopy(plain))}
        layouts["transposed"] = transposed_products(plain)
        model = layouts["input-major"]
    else:
        model, layouts = prepare_for_serving(plain, precision), {}
    settings = replace(Settings.from_config(config.generation), max_new_tokens=args.max_new_tokens)
    openers = simulate.held_out_openers(args.n, 2)
    system = config.model.system_prompt
    pool = simulate.held_out_openers(args.n * args.context_turns, 3)
    prompts = []
    for i, opener in enumerate(openers):  # earlier turns: other openers, as a long context
        said = pool[i * args.context_turns : (i + 1) * args.context_turns - 1] + [opener]
        turns = [Turn("user" if k % 2 == len(said) % 2 else "bot", t) for k, t in enumerate(said)]
        prompts.append(build_prompt(tokenizer, system, turns, 1024))
    keys = [row_key(2, i) for i in range(len(prompts))]
    rows, replies = [], {}
    ours = simulate._generate_group
    short = replace(settings, max_new_tokens=4)
    library_group(model, tokenizer, prompts[:4], short, keys[:4])  # warm-up, both paths
    ours(model, tokenizer, prompts[:4], short, 1, keys[:4])
    runs = [("transformers generate", model, library_group), ("decode_rows", model, None)]
    if layouts:
        runs = [(f"{name}, input-major", served, group) for name, served, group in runs]
        runs.append(("decode_rows, transposed", layouts["transposed"], None))
        ours(layouts["transposed"], tokenizer, prompts[:4], short, 1, keys[:4])
    for name, served, group in runs:
        if group is not None:
            simulate._generate_group = lambda m, t, p, s, c, k, g=group: g(m, t, p, s, k)
        start = time.perf_counter()
        cut: list[bool] = []
        replies[name] = simulate.generate_batch(
            served, tokenizer, prompts, settings, cut, keys=keys
        )
        rows.append((name, time.perf_counter() - start, sum(cut)))
        simulate._generate_group = ours
    first = replies[rows[0][0]]
    words = sum(len(r.split()) for r in replies[rows[1][0]]) / len(prompts)
    print(
        f"\n{args.n} held-out openers after {args.context_turns - 1} earlier turns "
        f"({sum(map(len, prompts)) / len(prompts):.0f} prompt tokens on average), one reply "
        f"each (up to {args.max_new_tokens} tokens, "
        f"{words:.1f} words on average), SmolLM2-135M {precision}, groups of "
        f"{simulate.GENERATE_GROUP}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.2f}"
    )
    print(f"| {'row':<36} | {'seconds':>8} | {'cut':>4} | {'speed-up':>8} | {'same replies':>12} |")
    print(f"|{'-' * 38}|{'-' * 10}|{'-' * 6}|{'-' * 10}|{'-' * 14}|")
    for name, seconds, cuts in rows:
        same = sum(a == b for a, b in zip(first, replies[name], strict=True))
        print(
            f"| {name:<36} | {seconds:>8.1f} | {cuts:>4} | {rows[0][1] / seconds:>7.2f}x "
            f"| {same:>5} of {len(prompts):<3} |"
        )


if __name__ == "__main__":
    main()
