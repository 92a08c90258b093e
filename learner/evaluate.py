"""Offline evaluation metrics of sampled replies (the paper's tables are the model).

Small pure functions shared by the experiment benchmark and ``rapport eval``:
distinct-n (diversity), perplexity of replies under the prior (fluency), and the
per-token KL(π‖prior) along replies (how far the policy moved from the prior).
"""

from __future__ import annotations

import torch


def distinct_n(replies: list[list[str]], n: int) -> float:
    """Distinct n-grams / all n-grams over all replies (Li et al. 2016); 0 if none.

    >>> distinct_n([["a", "b", "a", "b"]], 2)
    0.6666666666666666
    """
    grams = [tuple(r[i : i + n]) for r in replies for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def reply_logprobs(model, prompt_ids: list[int], reply_ids: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at each reply position: (len(reply), V)."""
    ids = torch.tensor([prompt_ids + reply_ids], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def perplexity(prior, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of the reply under ``prior``."""
    if not reply_ids:
        return float("nan")
    logp = reply_logprobs(prior, prompt_ids, reply_ids)
    nll = -logp.gather(1, torch.tensor(reply_ids, device=logp.device)[:, None]).mean()
    return float(torch.exp(nll))


def kl_per_token(policy, prior, prompt_ids: list[int], reply_ids: list[int]) -> float:
    """Mean over the reply's positions of KL(π(·|s) ‖ p(·|s)), exact over the vocabulary."""
    if not reply_ids:
        return 0.0
    pi = reply_logprobs(policy, prompt_ids, reply_ids)
    p = reply_logprobs(prior, prompt_ids, reply_ids)
    return float((pi.exp() * (pi - p)).sum(-1).mean())
