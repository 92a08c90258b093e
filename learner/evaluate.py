"""Offline evaluation metrics of sampled replies (the paper's tables are the model).

Small functions shared by the experiment benchmark and ``rapport eval``: distinct-n
(diversity), perplexity of replies under the prior (fluency), and the per-token
KL(π‖prior) along replies (how far the policy moved from the prior).

The model-based ones score many sequences in right-padded batches, sorted by length and
capped at ``BATCH_TOKENS`` tokens per forward, and read the log-probabilities only at
the positions that predict the scored tokens. One-sequence helpers are thin wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

BATCH_TOKENS = 4096  # tokens per forward: the (tokens x vocabulary) logits stay ~0.8 GB


def distinct_n(replies: list[list[str]], n: int) -> float:
    """Distinct n-grams / all n-grams over all replies (Li et al. 2016); 0 if none.

    >>> distinct_n([["a", "b", "a", "b"]], 2)
    0.6666666666666666
    """
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _batches(sequences: Sequence[list[int]], budget: int) -> Iterator[list[int]]:
    """Indices of ``sequences`` grouped shortest first, each group <= ``budget`` tokens
    once padded (a longer sequence goes alone)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    group: list[int] = []
    for i in order:
        if group and len(sequences[i]) * (len(group) + 1) > budget:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


@torch.no_grad()
def position_logprobs(
    model,
    sequences: Sequence[list[int]],
    positions: Sequence[list[int]],
    budget: int = BATCH_TOKENS,
) -> Iterator[tuple[int, torch.Tensor]]:
    """For each sequence ``i``, the float32 log-softmax over the vocabulary at
    ``positions[i]`` (position ``t`` predicts token ``t + 1``): yields ``(i, (P, V))``
    in batch order, not input order."""
    for group in _batches(sequences, budget):
        width = max(len(sequences[i]) for i in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        device = getattr(model, "device", torch.device("cpu"))
        # the output layer (49,152 x 576: a fifth of SmolLM2-135M's per-token work) only
        # where a position is read, not on every prompt token
        hidden = model.get_decoder()(
            input_ids=ids.to(device), attention_mask=mask.to(device)
        ).last_hidden_state
        head = model.get_output_embeddings()
        for row, i in enumerate(group):
            at = torch.tensor(positions[i], dtype=torch.long, device=hidden.device)
            yield i, torch.log_softmax(head(hidden[row, at]).float(), dim=-1)


def reply_positions(prompt_ids: list[int], reply_ids: list[int]) -> list[int]:
    """The positions that predict the reply's tokens in ``prompt_ids + reply_ids``."""
    return list(range(len(prompt_ids) - 1, len(prompt_ids) + len(reply_ids) - 1))


def perplexities(
    prior, sequences: Sequence[list[int]], positions: Sequence[list[int]]
) -> list[float]:
    """exp of the mean negative log-likelihood under ``prior`` of the tokens predicted at
    ``positions`` of each sequence (nan where there are none)."""
    out = [float("nan")] * len(sequences)
    todo = [i for i, p in enumerate(positions) if p]
    sub_seqs = [sequences[i] for i in todo]
    sub_pos = [positions[i] for i in todo]
    for j, logp in position_logprobs(prior, sub_seqs, sub_pos):
        targets = torch.tensor([sub_seqs[j][t + 1] for t in sub_pos[j]])
        out[todo[j]] = float(torch.exp(-logp.gather(1, targets[:, None]).mean()))
    return out


def kl_per_tokens(
    policy,
    prior,
    sequences: Sequence[list[int]],
    positions: Sequence[list[int]],
    taken: list | None = None,
) -> list[float]:
    """For each sequence, the mean over ``positions`` of KL(π(·|s) ‖ p(·|s)), exact over
    the vocabulary (0 where there are no positions). If ``taken`` is a list, it receives
    for each sequence the prior's log-probability of the token that follows each
    position ({position: log p}): the perplexity of any reply read at those positions
    comes with the KL, without another forward of the prior (see
    :func:`perplexity_from`)."""
    out = [0.0] * len(sequences)
    if taken is not None:
        taken.extend({} for _ in sequences)
    todo = [i for i, p in enumerate(positions) if p]
    sub_seqs = [sequences[i] for i in todo]
    sub_pos = [positions[i] for i in todo]
    pairs = zip(
        position_logprobs(policy, sub_seqs, sub_pos),
        position_logprobs(prior, sub_seqs, sub_pos),
        strict=True,
    )
    for (j, pi), (_, p) in pairs:  # same batching, so the same order
        out[todo[j]] = float((pi.exp() * (pi - p)).sum(-1).mean())
        if taken is not None:
            targets = torch.tensor([sub_seqs[j][t + 1] for t in sub_pos[j]])
            read = p.gather(1, targets[:, None])[:, 0].tolist()
            taken[todo[j]] = dict(zip(sub_pos[j], read, strict=True))
    return out


def perplexity_from(taken: dict[int, float], positions: Sequence[int]) -> float:
    """exp of the mean negative log-likelihood at ``positions`` read from the prior's
    log-probabilities of :func:`kl_per_tokens` (``taken``); nan where there are none."""
    if not positions:
        return float("nan")
    return math.exp(-sum(taken[t] for t in positions) / len(positions))


def perplexity(prior, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of the reply under ``prior``."""
    return perplexities(prior, [prompt_ids + reply_ids], [reply_positions(prompt_ids, reply_ids)])[
        0
    ]


def kl_per_token(policy, prior, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """Mean over the reply's positions of KL(π(·|s) ‖ p(·|s)), exact over the vocabulary."""
    positions = [reply_positions(prompt_ids, reply_ids)]
    return kl_per_tokens(policy, prior, [prompt_ids + reply_ids], positions)[0]
