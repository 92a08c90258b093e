"""KL-control Q-learning, Psi-learning and G-learning, and the naive batch Q baseline
(Jaques et al. 2017 "Sequence Tutor"; Jaques et al. 2019 "Way Off-Policy").

Token-level: the state s is the window's tokens up to position t, the action a the next
token. r is the turn's reward (z-units, clipped; see :mod:`learner.data`) on the turn's
last trained action, 0 elsewhere; c the reward scale; primes mark the target network.

Q from logits, and the zero-reward fixed point
-----------------------------------------------
Every network starts from the prior's weights, so its logits ℓ(s,a) equal the prior's
ℓ_p(s,a) = log p(a|s) + b(s), b(s) the prior's log-partition (cached per state with the
dataset). Each algorithm reads its Q from the logits so that the *untrained network is
the zero-reward fixed point of its own Bellman equation*: with r ≡ 0 the TD error is 0 at
every logged token, nothing moves, and the served policy stays the prior. Only the
reward moves it. The served policy is always softmax(ℓ_θ): the per-state terms below are
constant in a, so they never change what is sampled; no prior is needed at serving time.

    psi:     Ψ(s,a) = ℓ_θ − b(s)                     π = softmax Ψ = softmax ℓ_θ
             y = r/c + log p(a|s) + γ V'(s'),       V'(s) = logsumexp_a Ψ'(s,a)
             Ψ starts at log p, and logsumexp log p = 0: the fixed point at r = 0.
    g:       G(s,a) = ℓ_θ − b(s) − log p(a|s)        π ∝ p e^G = softmax ℓ_θ
             y = r/c + γ log Σ_a p(a|s') e^{G'(s',a)}
             G starts at 0. This is Ψ-learning re-parameterised (G = Ψ − log p, Sequence
             Tutor's own observation): the TD errors are identical, so the g row must
             match psi's; serving p·e^G as p² (a prior counted twice, the old `PriorPlus`)
             is gone.
    kl_q:    Q(s,a) = ℓ_θ − b(s)                     π = softmax Q = softmax ℓ_θ
             y = r/c + log p(a|s) + γ [max_a Q'(s',a) − max_a log p(a|s')]
             The paper's target has γ max Q'(s') alone; at Q = log p that backs up
             γ max log p(s') < 0 at every token (measured −1.31 nats/token on SmolLM2),
             pushing every logged token down whatever the reward. Subtracting the prior's
             own max is potential-based shaping (Ng et al. 1999): token sequences form a
             tree, so Φ(s_{t+1}) = Φ(s_t)/γ − max log p(s_{t+1}) is a function of the
             state, the shaping term γΦ(s') − Φ(s) is exactly −γ max log p(s'), and the
             optimal greedy and Boltzmann policies are unchanged. It is kept as the
             paper's hard-max comparison.
    batch_q: Q(s,a) = ℓ_θ − b(s)                     π = softmax Q
             y = r/c + γ max_a Q'(s',a)             (no prior: nothing anchors it)
             The naive baseline. It has no zero-reward fixed point at the prior: even
             with r ≡ 0 it pushes each logged token towards γ max Q'(s') and drifts,
             which is the paper's finding (batch Q collapses); a test shows it.

The dueling form (``TrainConfig.dueling``): the state's value out of the logits' offset
-------------------------------------------------------------------------------------
Every Q above is ℓ_θ(s,a) − b(s) = log π_θ(a|s) + [logsumexp ℓ_θ(s) − b(s)]: the policy
plus the state's (soft) value, which the raw form stores in the common offset of the
LM's logits. On SmolLM2 that offset is the network's most sensitive direction: one
Adam step at lr 2.5e-5 moved the mean Ψ of the logged tokens by −1.1 nats, and over 16
steps it swung between −0.2 and −5.4 (bench/RESULTS.md, thirteenth run) while the
reward is ±1 in z-units. The TD error is then mostly the offset's, the clipped gradient
mostly corrects it, and what reaches the policy is noise: psi spent KL 0.14 nats/token
and did not move the question rate. So with ``dueling`` (Wang et al. 2016's dueling
decomposition; rapport's default and the learning bench's setting, ``--no-dueling`` for
the raw form; on the tests' toy batch_q then raises the rewarded word further than psi,
but at four times its KL and less per nat of it) the two parts are read apart:

    Q(s,a) − b(s) = log π_θ(a|s) + V_φ(s)

log π_θ the log-softmax of the LM's logits (a common offset has no gradient there) and
V_φ a linear head on the layer-normalised last hidden state, detached, zero at the
start (learner.train.ValueHead). Every formula above holds with ℓ̃ = log π_θ + V_φ + b in
place of ℓ_θ: the untrained learner is still the zero-reward fixed point (V_φ = 0,
π_θ = p), the served policy is still softmax ℓ_θ, and V_φ is used in training only
(the saved model is an ordinary LM). The cost: the online network's log-softmax over
the vocabulary at the trained positions (the raw form reads one row of the output layer
per action), lost in the step-to-step spread on SmolLM2: psi steps of 4 windows of
<= 256 tokens on 2 idle cores of an AVX2 EPYC, median 63 tokens/s raw and 85 dueling,
single steps 46-100 (thirteenth run). On the 32-wide toy model of the tests the
vocabulary is most of the work and a step is several times slower.

Credit that reaches the words that earned it
--------------------------------------------
One-step targets move the turn's reward back about one token per target refresh, and
the words that make a question sit 10–30 tokens before the end of turn. So the target is
a λ-return along the logged tokens of the turn, cut at the turn boundary, where it
bootstraps across the user's reply (or ends at the conversation's end):

    Y_t = R_t + γ V'(s_{t+1}) + γλ [Y_{t+1} − Q'(s_{t+1}, a_{t+1})]   inside the turn
    Y_t = R_t + γ V'(s_next)                                           at the turn's end

with R_t = r_t/c (+ log p(a_t|s_t) for psi and kl_q). λ = 0 is the one-step target.
With λ = 1 it unrolls Q'(s_{t+1}, a_{t+1}) by its own one-step target along the logged
path: for psi this is path consistency (V'(s) − Ψ'(s,a) = −log π'(a|s), exact for any
action), so the fixed point is the one-step target's, and the reward reaches every token
of the turn on the first update. The Huber threshold is at least the largest |r|/c (see
:func:`huber_delta`), so a reward is never clipped into the same gradient as no reward.

Monte-Carlo dropout (the paper's pessimistic target)
-----------------------------------------------------
The paper drops units of the target network and takes the minimum of M estimates of
V'(s'). On SmolLM2 a few hidden dimensions are huge; dropping one shifts every logit of
a state at once, the offset that Q = ℓ − b(s) subtracts, so the noise lands on V' whole:
at M = 5, p = 0.1 the target sat 2–5 nats below Ψ at the zero-reward fixed point, more
than the reward. Here dropout perturbs only the target's learned *deviation* from the
prior: h̃ = h_p + dropout(h' − h_p). At the start h' = h_p and the target is exact; the
pessimism grows with how far the policy has moved, which is the uncertainty the paper
meant to penalise. M = 1 (no dropout) is the default because it costs nothing; M > 1
needs one more prior forward per step.

The small functions below are the math, each tested against a naive loop and against a
brute-force full-vocabulary oracle (tests/test_learner_math.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from learner.data import TERMINAL

ALGORITHMS = ("psi", "g", "kl_q", "batch_q")
# log p(a|s) in the per-step reward R_t (KL-control's "reward" of staying close to p)
USES_PRIOR_LOGP = {"kl_q": True, "psi": True, "g": False, "batch_q": False}


def state_value(logits: torch.Tensor, algo: str) -> torch.Tensor:
    """max or logsumexp of the logits over the vocabulary: (..., V) -> (...)."""
    if algo in ("kl_q", "batch_q"):
        return logits.max(dim=-1).values
    return torch.logsumexp(logits, dim=-1)


def value_from_logits(
    logits: torch.Tensor,  # (..., V) a network's logits at states s
    prior_lse: torch.Tensor,  # (...) b(s), the prior's log-partition
    prior_max: torch.Tensor,  # (...) max_a log p(a|s)
    algo: str,
) -> torch.Tensor:
    """V(s) in each algorithm's own convention (module doc): (..., V) -> (...).

    psi and g: logsumexp ℓ − b;  kl_q: max ℓ − b − max log p;  batch_q: max ℓ − b.
    All but batch_q are 0 when the logits are the prior's.
    """
    value = state_value(logits.float(), algo) - prior_lse
    return value - prior_max if algo == "kl_q" else value


def q_from_logit(
    logit: torch.Tensor,  # (...) ℓ(s, a) of one action per state
    prior_lse: torch.Tensor,  # (...) b(s)
    prior_logp: torch.Tensor,  # (...) log p(a|s) of that action
    algo: str,
) -> torch.Tensor:
    """Q(s,a) from the network's logit of a: ℓ − b, and for g also − log p(a|s)."""
    q = logit.float() - prior_lse
    return q - prior_logp if algo == "g" else q


def step_reward(
    reward: torch.Tensor,  # (B, T) r on a turn's last trained action, else 0
    prior_logp: torch.Tensor,  # (B, T) log p(a_t|s_t) of the logged action
    reward_scale: float,
    algo: str,
) -> torch.Tensor:
    """R_t = r_t/c [+ log p(a_t|s_t)]."""
    scaled = reward / reward_scale
    return scaled + prior_logp if USES_PRIOR_LOGP[algo] else scaled


def lambda_returns(
    step: torch.Tensor,  # (B, T) R_t
    next_value: torch.Tensor,  # (B, T) V'(s_next) at next_pos, already 0 at terminals
    target_q: torch.Tensor,  # (B, T) Q'(s_t, a_t) of the logged action (trained positions)
    mask: torch.Tensor,  # (B, T) trained positions
    next_pos: torch.Tensor,  # (B, T) bootstrap position, TERMINAL at a conversation's end
    gamma: float,
    lam: float,
) -> torch.Tensor:
    """The λ-return targets Y (B, T) of the module doc, one backward pass over T.

    The turn goes on at t when the next position is t+1 and is itself trained; anywhere
    else (a turn's end, a cut reply's last kept token) Y bootstraps from V'(s_next) only.
    """
    B, T = step.shape
    positions = torch.arange(T, device=step.device)
    goes_on = mask & (next_pos == positions + 1)
    goes_on[:, :-1] &= mask[:, 1:]
    goes_on[:, -1] = False
    out = torch.zeros_like(step)
    later = torch.zeros(B, device=step.device)  # Y_{t+1} − Q'_{t+1}, where the turn goes on
    for t in range(T - 1, -1, -1):
        y = step[:, t] + gamma * next_value[:, t]
        y = torch.where(goes_on[:, t], y + gamma * lam * later, y)
        out[:, t] = y
        later = y - target_q[:, t]
    return out


def bootstrap(values: torch.Tensor, next_pos: torch.Tensor) -> torch.Tensor:
    """V'(s') for every position: values (B, T) gathered at next_pos (B, T); 0 where
    next_pos is TERMINAL."""
    done = next_pos == TERMINAL
    gathered = values.gather(1, next_pos.clamp(min=0))  # (B, T)
    return torch.where(done, torch.zeros_like(gathered), gathered)


def huber_delta(configured: float, reward_clip: float, reward_scale: float) -> float:
    """The Huber threshold actually used: never below the largest |r|/c, so the whole
    range of rewards keeps its quadratic (proportional) gradient."""
    return max(configured, reward_clip / reward_scale)


def huber_td_loss(q_taken, target, mask, delta: float) -> torch.Tensor:
    """Mean Huber loss of Q(s,a) − y over the masked (bot) positions."""
    return F.huber_loss(q_taken[mask], target[mask].detach(), delta=delta)


def mc_dropout_logits(
    hidden: torch.Tensor,  # (N, H) target network's last hidden states
    prior_hidden: torch.Tensor | None,  # (N, H) the prior's, at the same states
    head,  # the target's output layer: (..., H) -> (..., V)
    samples: int,
    dropout: float,
    reduce,  # (M, n, V) logits -> (n,) e.g. the minimum over M of V'
    max_elements: int = 2**27,
) -> torch.Tensor:
    """Apply ``reduce`` to M dropout samples of the target's logits, where dropout
    perturbs only the learned deviation h' − h_p (module doc); with M = 1, no dropout or
    no prior hidden state, to the plain logits (1, N, V). Chunked over positions so that
    the (M, n, V) logits stay under ``max_elements`` floats."""
    if samples == 1 or dropout == 0 or prior_hidden is None:
        samples = 1
    vocab = head.weight.shape[0]
    chunk = max(1, max_elements // (samples * vocab))
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]  # (n, H)
        if samples == 1:
            noisy = h.unsqueeze(0)
        else:
            base = prior_hidden[start : start + chunk]
            deviation = (h - base).unsqueeze(0).expand(samples, *h.shape)
            noisy = base.unsqueeze(0) + F.dropout(deviation, p=dropout, training=True)
        out.append(reduce(head(noisy).float(), start, start + h.shape[0]))
    return torch.cat(out)


def taken_action_values(hidden: torch.Tensor, head, actions: torch.Tensor) -> torch.Tensor:
    """ℓ(s, a) of the logged actions only: (N, H), (N,) -> (N,), one row of the output
    layer per action instead of the full vocabulary."""
    rows = head.weight[actions]  # (N, H)
    values = (hidden * rows.to(hidden.dtype)).sum(-1)
    if getattr(head, "bias", None) is not None:
        values = values + head.bias[actions]
    return values.float()
