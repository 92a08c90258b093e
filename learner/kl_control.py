"""KL-control Q-learning, Psi-learning and G-learning, and the naive batch Q baseline
(Jaques et al. 2017 "Sequence Tutor"; Jaques et al. 2019 "Way Off-Policy").

Token-level: the state is the window's tokens up to position t, the action the next
token. With r the reward on a bot turn's last token (0 elsewhere), c the reward scale,
primes the target network and V'(s') its value of the next state:

    kl_q:    y = r/c + log p(a|s) + γ max_a' Q'(s',a')                    π = softmax(Q/T)
    psi:     y = r/c + log p(a|s) + γ log Σ_a' exp Ψ'(s',a')              π ∝ exp Ψ
    g:       y = r/c + γ log Σ_a' exp(log p(a'|s') + G'(s',a'))           π ∝ p e^G
    batch_q: y = r/c + γ max_a' Q'(s',a')                      (no prior: drifts away)

V'(s') is 0 at the end of a conversation. Monte-Carlo dropout (the paper's lower bound
on the target): M dropout masks on the target network's last hidden state, V' from each,
the minimum taken. Only the values that are needed are computed: Q(s,a) of the logged
action is a dot product with that action's output row, not a full-vocabulary matmul,
and V' is computed only at the positions the targets bootstrap from. The loss is Huber
on the TD error over bot tokens only.

Q from logits. The networks start from the prior's weights, so their logits ℓ(s,a) are
the initial Q. Logits carry an arbitrary per-state offset (softmax ignores it, Q-learning
does not): ℓ = log p(a|s) + b(s) with b(s) the prior's log-partition. Left in, b makes
the logged actions' values jump by b(s) − γ b(s') on the first updates while the unlogged
actions keep theirs, and the policy drifts for no reason in the data. So Q(s,a) =
ℓ_θ(s,a) − b(s), with b the frozen prior's, cached per state with the dataset: Q starts
at log p(a|s), which with zero reward is already the fixed point of Ψ-learning, and since
b(s) is constant in a the served policy is still the softmax of the network's logits.

The small functions below are the math, each tested against a naive per-token loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.data import TERMINAL

# How each algorithm turns the target network's logits at s' into V'(s').
NEXT_VALUE = {"kl_q": "max", "batch_q": "max", "psi": "logsumexp", "g": "prior_logsumexp"}
USES_PRIOR_LOGP = {"kl_q": True, "psi": True, "g": False, "batch_q": False}


def state_value(logits: torch.Tensor, kind: str, prior_logp: torch.Tensor | None = None):
    """V(s) from logits over the vocabulary: (..., V) -> (...)."""
    if kind == "max":
        return logits.max(dim=-1).values
    if kind == "logsumexp":
        return torch.logsumexp(logits, dim=-1)
    if kind == "prior_logsumexp":
        return torch.logsumexp(prior_logp + logits, dim=-1)
    raise ValueError(kind)


def bootstrap(values: torch.Tensor, next_pos: torch.Tensor) -> torch.Tensor:
    """V'(s') for every position: values (B, T) gathered at next_pos (B, T); 0 where
    next_pos is TERMINAL."""
    done = next_pos == TERMINAL
    gathered = values.gather(1, next_pos.clamp(min=0))  # (B, T)
    return torch.where(done, torch.zeros_like(gathered), gathered)


def td_target(
    reward: torch.Tensor,  # (B, T) reward on a turn's last action, else 0
    logp: torch.Tensor,  # (B, T) prior log p(a_t|s_t) of the logged action
    next_value: torch.Tensor,  # (B, T) V'(s_{t+1}) already 0 at terminals
    gamma: float,
    reward_scale: float,
    use_prior_logp: bool,
) -> torch.Tensor:
    """y = r/c [+ log p(a|s)] + γ V'(s')."""
    target = reward / reward_scale + gamma * next_value
    return target + logp if use_prior_logp else target


def huber_td_loss(q_taken, target, mask, delta: float) -> torch.Tensor:
    """Mean Huber loss of Q(s,a) − y over the masked (bot) positions."""
    return F.huber_loss(q_taken[mask], target[mask].detach(), delta=delta)


def mc_dropout_values(
    hidden: torch.Tensor,  # (N, H) target network's last hidden states at s'
    head,  # the output layer: (..., H) -> (..., V)
    kind: str,
    samples: int,
    dropout: float,
    prior_logp: torch.Tensor | None = None,  # (N, V) for kind == "prior_logsumexp"
    max_elements: int = 2**27,
) -> torch.Tensor:
    """min over M dropout masks of V'(s'): (N,). With M = 1 or no dropout, plain V'.

    The trunk ran once; the M masks go on its last hidden state and the M output-layer
    products run as one batched matmul, in chunks of positions so that the (M, n, V)
    logits stay under ``max_elements`` floats.
    """
    if samples == 1 or dropout == 0:
        return state_value(head(hidden).float(), kind, prior_logp)
    vocab = head.weight.shape[0]
    chunk = max(1, max_elements // (samples * vocab))
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]  # (n, H)
        noisy = F.dropout(h.unsqueeze(0).expand(samples, *h.shape), p=dropout, training=True)
        logits = head(noisy).float()  # (M, n, V)
        p = None if prior_logp is None else prior_logp[start : start + chunk].unsqueeze(0)
        out.append(state_value(logits, kind, p).min(dim=0).values)  # (n,)
    return torch.cat(out)


def taken_action_values(hidden: torch.Tensor, head, actions: torch.Tensor) -> torch.Tensor:
    """Q(s, a) of the logged actions only: (N, H), (N,) -> (N,), one row of the output
    layer per action instead of the full vocabulary."""
    rows = head.weight[actions]  # (N, H)
    values = (hidden * rows.to(hidden.dtype)).sum(-1)
    if getattr(head, "bias", None) is not None:
        values = values + head.bias[actions]
    return values.float()
