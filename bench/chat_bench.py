"""Chat latency: time to first token and tokens/s of a 40-token reply on CPU.

Rows, all on the default model (SmolLM2-135M-Instruct) in the same run:

- ``rapport fp32`` / ``bf16`` / ``int8 (served)``: ``Policy.stream_tokens`` (our decoding
  loop over the KV cache) with the weights in that precision (``model.serve_precision``;
  int8 is weight-only int8 with bf16 compute, the default);
- ``torch dynamic int8 (rejected)``: torch's dynamic quantisation (int8 weights and
  activations), fast but it damages replies (higher perplexity);
- ``transformers generate fp32``: ``model.generate`` on the same prompts, the baseline
  measured before any work;
- ``llama.cpp (peer)``: ``llama-cpp-python`` on the same GGUF file with the same thread
  count, when it is installed (it compiles from source, about 10 minutes: ``pip install
  llama-cpp-python``); otherwise one line says it was skipped.

Each row is the median over the prompts (>= 10 replies); every reply is forced to 40 new
tokens (end-of-turn suppressed) so rows compare the same work. Quality: the perplexity,
under the fp32 model, of the replies each precision samples (same prompts, same seeds);
a precision that damaged the model would write replies the fp32 model finds unlikely.

Goal (issue 3): >= 60 tokens/s and TTFT <= 150 ms on 2 cores, within 2x of llama.cpp.

Run: ``.venv/bin/python bench/chat_bench.py [--replies N]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Config  # noqa: E402
from bot.policy import (  # noqa: E402
    Policy,
    Settings,
    default_gguf_path,
    default_model_dir,
    load_model,
    prepare_for_serving,
)
from bot.prompt import Turn  # noqa: E402

PROMPTS = [
    "Hi! How was your day?",
    "What do you like to do on weekends?",
    "I just got back from a trip to the mountains.",
    "Do you have any pets?",
    "What's your favourite food?",
    "I'm so tired today, work was crazy.",
    "Have you seen any good movies lately?",
    "lol that's hilarious",
    "Tell me something interesting.",
    "What music do you listen to?",
    "I started learning to play the guitar.",
    "Where would you go on holiday if you could go anywhere?",
]
NEW_TOKENS = 40


def time_stream(policy: Policy, prompt_ids: list[int]) -> tuple[float, float, list[int]]:
    """(time to first token s, tokens/s after the first, tokens) for one forced-length reply."""
    start = time.perf_counter()
    first = None
    tokens = []
    for token in policy.stream_tokens(prompt_ids):
        if first is None:
            first = time.perf_counter() - start
        tokens.append(token)
    elapsed = time.perf_counter() - start
    return first, (len(tokens) - 1) / (elapsed - first), tokens


def bench_prompts(policy: Policy, replies: int) -> list[list[int]]:
    """The prompt ids of ``replies`` one-turn chats (PROMPTS, repeated as needed)."""
    prompts = [policy.prompt_ids([Turn("user", p)]) for p in PROMPTS[:replies]]
    while len(prompts) < replies:
        prompts += prompts[: replies - len(prompts)]
    return prompts


def forced_policy(model, tokenizer, config: Config, seed: int) -> Policy:
    settings = Settings.from_config(config.generation)
    policy = Policy(
        model, tokenizer, version="bench", model_config=config.model, settings=settings, seed=seed
    )
    policy.stop_ids = set()  # force exactly NEW_TOKENS tokens
    return policy


@torch.inference_mode()
def perplexity(model, prompt_ids: list[int], reply: list[int]) -> float:
    ids = torch.tensor([prompt_ids + reply])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(reply))
    return float(torch.exp(nll))


def dynamic_int8(model):
    """torch's dynamic int8 (weights and activations), per-channel: the lever we rejected."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    return torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig}
    )


def bench_rapport(name, model, tokenizer, config, prompts, fp32_model=None) -> dict:
    """One row: each prompt's forced-length reply; perplexity when a fp32 judge is given."""
    ttfts, rates, ppls = [], [], []
    for i, prompt_ids in enumerate(prompts):
        policy = forced_policy(model, tokenizer, config, seed=i)
        ttft, rate, tokens = time_stream(policy, prompt_ids)
        ttfts.append(ttft)
        rates.append(rate)
        if fp32_model is not None:
            ppls.append(perplexity(fp32_model, prompt_ids, tokens))
    return {"name": name, "ttft": ttfts, "rate": rates, "ppl": ppls or None}


@torch.inference_mode()
def bench_generate(model, tokenizer, config, prompts) -> dict:
    ttfts, rates = [], []
    g = config.generation
    for prompt_ids in prompts:
        ids = torch.tensor([prompt_ids])
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(
            ids,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=g.temperature,
            top_p=g.top_p,
            repetition_penalty=g.repetition_penalty,
        )
        elapsed = time.perf_counter() - start
        ttfts.append(ttft)
        rates.append((NEW_TOKENS - 1) / max(elapsed - ttft, 1e-9))
    return {"name": "transformers generate fp32", "ttft": ttfts, "rate": rates, "ppl": None}


def bench_llama_cpp(prompts, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(default_gguf_path()), n_ctx=2048, n_threads=threads, verbose=False)
    ttfts, rates = [], []
    for i, prompt_ids in enumerate(prompts):
        llm.reset()
        start = time.perf_counter()
        first = None
        count = 0
        llm.set_seed(i)
        for _ in llm.generate(prompt_ids, temp=0.7, top_p=0.9, repeat_penalty=1.1):
            if first is None:
                first = time.perf_counter() - start
            count += 1
            if count == NEW_TOKENS:
                break
        elapsed = time.perf_counter() - start
        ttfts.append(first)
        rates.append((count - 1) / (elapsed - first))
    return {"name": "llama.cpp (peer)", "ttft": ttfts, "rate": rates, "ppl": None}


def bench_ranker(folder: Path):
    """A ranking ensemble as ``rapport reward-model train`` makes one (its members, size,
    input length), built from the default model with an untrained score head: it ranks
    at random, but costs what a trained one costs."""
    import json

    from transformers import AutoModelForSequenceClassification

    from learner.reward_model import RewardModelConfig
    from rewards.learned_reward import INFO_FILE
    from rewards.rank import RewardRanker

    rm = RewardModelConfig()
    base = default_model_dir()
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(folder / "member")
    load_model(base)[1].save_pretrained(folder / "member")
    info = {
        "id": "bench",
        "target": "votes",
        "members": ["member"] * rm.members,  # the same weights, as many forwards
        "max_tokens": rm.max_tokens,
        "normalisation": [(0.0, 1.0)] * rm.members,
    }
    (folder / INFO_FILE).write_text(json.dumps(info))
    return RewardRanker(folder)


def bench_best_of(policy: Policy, prompts: list[str], n: int) -> dict:
    """Time to the reply a person is shown, as bot.session sends it: with n = 1 one reply
    streamed to its end; with n > 1 the n candidates sampled together, then ranked.
    Replies end where the model ends them (generation.max_new_tokens at most)."""
    from rewards.rank import rank

    total, sampling = [], []
    for i, text in enumerate(prompts):
        policy.generator = torch.Generator().manual_seed(i)
        turns = [Turn("user", text)]
        start = time.perf_counter()
        if n == 1:
            policy.reply(turns)
            sampling.append(time.perf_counter() - start)
        else:
            candidates = policy.sample_replies(turns, n)
            sampling.append(time.perf_counter() - start)
            texts = [c.text for c in candidates]
            rank(text, texts, policy.ranker, policy.caution)
        total.append(time.perf_counter() - start)
    return {"name": f"best-of-{n}", "total": total, "sampling": sampling}


def best_of_rows(config: Config, model, tokenizer, replies: int, n: int) -> None:
    """Time to the chosen reply, best-of-n vs one reply, on the same prompts and seeds
    (issue 18 goal: <= 1.5x), with the share of sampling and of ranking."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ranker = bench_ranker(Path(tmp))
        settings = Settings.from_config(config.generation)
        policy = Policy(
            model,
            tokenizer,
            version="bench",
            model_config=config.model,
            settings=settings,
            seed=0,
            best_of=n,
            ranker=ranker,
            caution=config.generation.best_of_caution,
        )
        prompts = (PROMPTS * replies)[:replies]
        bench_best_of(policy, prompts[:1], n)  # warm-up
        rows = [bench_best_of(policy, prompts, 1), bench_best_of(policy, prompts, n)]
    members = len(ranker.ensemble.members)
    print(
        f"\ntime to the chosen reply ({replies} prompts, up to "
        f"{config.generation.max_new_tokens} tokens, {members} ranking members; medians)"
    )
    print(f"{'row':<12} {'total ms':>9} {'sampling ms':>12} {'ranking ms':>11}")
    for row in rows:
        total, sampling = statistics.median(row["total"]), statistics.median(row["sampling"])
        ranking = statistics.median(
            a - b for a, b in zip(row["total"], row["sampling"], strict=True)
        )
        print(
            f"{row['name']:<12} {total * 1000:>9.0f} {sampling * 1000:>12.0f} "
            f"{ranking * 1000:>11.0f}"
        )
    ratio = statistics.median(rows[1]["total"]) / statistics.median(rows[0]["total"])
    print(f"best-of-{n} / one reply: {ratio:.2f}x (goal <= 1.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=12, help="replies per row (>= 10)")
    parser.add_argument(
        "--best-of", type=int, default=4, help="time to the chosen reply, best-of-N vs one"
    )
    parser.add_argument(
        "--best-of-only", action="store_true", help="only the best-of-N rows (served int8)"
    )
    args = parser.parse_args()
    config = Config()
    if args.best_of_only:
        model, tokenizer = load_model(default_model_dir())
        served = prepare_for_serving(model, config.model.serve_precision)
        best_of_rows(config, served, tokenizer, args.replies, args.best_of)
        return
    config.generation.max_new_tokens = NEW_TOKENS
    fp32_model, tokenizer = load_model(default_model_dir())
    policy = forced_policy(fp32_model, tokenizer, config, seed=0)
    prompts = bench_prompts(policy, args.replies)
    threads = torch.get_num_threads()
    # warm-up: first calls allocate and pick kernels
    time_stream(policy, prompts[0])

    rows = [bench_rapport("rapport fp32", fp32_model, tokenizer, config, prompts, fp32_model)]
    candidates = [
        ("rapport bf16", prepare_for_serving(copy.deepcopy(fp32_model), "bf16")),
        ("rapport int8 (served)", prepare_for_serving(copy.deepcopy(fp32_model), "int8")),
        ("torch dynamic int8 (rejected)", dynamic_int8(fp32_model)),
    ]
    for name, model in candidates:
        time_stream(forced_policy(model, tokenizer, config, 0), prompts[0])
        rows.append(bench_rapport(name, model, tokenizer, config, prompts, fp32_model))
    rows.append(bench_generate(fp32_model, tokenizer, config, prompts))
    peer = bench_llama_cpp(prompts, threads)

    print(f"threads: {threads}; {len(prompts)} replies of {NEW_TOKENS} tokens per row")
    print(f"{'engine':<28} {'TTFT ms':>8} {'tokens/s':>9} {'ppl (fp32 judge)':>17}")
    for row in rows + ([peer] if peer else []):
        ppl = f"{statistics.median(row['ppl']):.2f}" if row["ppl"] else "-"
        print(
            f"{row['name']:<28} {statistics.median(row['ttft']) * 1000:>8.0f} "
            f"{statistics.median(row['rate']):>9.1f} {ppl:>17}"
        )
    if peer is None:
        print("llama.cpp (peer): skipped, llama-cpp-python is not installed")
    best = rows[2]  # rapport int8 (served)
    rate, ttft = statistics.median(best["rate"]), statistics.median(best["ttft"]) * 1000
    print(
        f"\nint8 (served by default): {rate:.1f} tokens/s (goal >= 60), TTFT {ttft:.0f} ms "
        "(goal <= 150)"
    )
    if peer:
        print(
            f"llama.cpp / int8 tokens/s: {statistics.median(peer['rate']) / rate:.2f}x (goal <= 2x)"
        )
    if args.best_of > 1:
        config = Config()  # replies end where the model ends them, as in the chat
        best_of_rows(config, candidates[1][1], tokenizer, args.replies, args.best_of)


if __name__ == "__main__":
    main()
