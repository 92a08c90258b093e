"""The KL-control targets against naive per-token loops on tiny random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from learner import kl_control
from learner.data import TERMINAL

B, T, V = 2, 7, 5
GAMMA, C = 0.9, 0.5


def naive_targets(algo, reward, logp, target_logits, prior_next_logp, next_pos):
    """y_t for every position, one token at a time, straight from the formulas."""
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            n = int(next_pos[b, t])
            if n == TERMINAL:
                v = 0.0
            else:
                q = [float(target_logits[b, n, a]) for a in range(V)]
                if algo in ("kl_q", "batch_q"):
                    v = max(q)
                elif algo == "psi":
                    v = math.log(sum(math.exp(x) for x in q))
                else:  # g
                    lp = [float(prior_next_logp[b, n, a]) for a in range(V)]
                    v = math.log(sum(math.exp(lp[a] + q[a]) for a in range(V)))
            y = float(reward[b, t]) / C + GAMMA * v
            if algo in ("kl_q", "psi"):
                y += float(logp[b, t])
            out[b, t] = y
    return out


@pytest.mark.parametrize("algo", ["kl_q", "psi", "g", "batch_q"])
def test_targets_match_a_naive_loop_including_cross_turn_bootstrap_and_terminals(algo):
    torch.manual_seed(0)
    reward = torch.zeros(B, T)
    reward[0, 2], reward[1, 5] = 1.5, -0.7  # last tokens of bot turns
    logp = -torch.rand(B, T) * 3
    target_logits = torch.randn(B, T, V)
    prior_next_logp = torch.log_softmax(torch.randn(B, T, V), -1)
    next_pos = torch.arange(1, T + 1).repeat(B, 1)
    next_pos[0, 2] = 5  # across the user's reply into the next bot turn's first state
    next_pos[1, 5] = TERMINAL  # the conversation ends
    next_pos[:, T - 1] = TERMINAL

    kind = kl_control.NEXT_VALUE[algo]
    values = kl_control.state_value(
        target_logits, kind, prior_next_logp if algo == "g" else None
    )  # (B, T)
    got = kl_control.td_target(
        reward,
        logp,
        kl_control.bootstrap(values, next_pos),
        GAMMA,
        C,
        kl_control.USES_PRIOR_LOGP[algo],
    )
    want = naive_targets(algo, reward, logp, target_logits, prior_next_logp, next_pos)
    assert torch.allclose(got, want, atol=1e-5)
    assert got[1, 5] == pytest.approx(
        -0.7 / C + (float(logp[1, 5]) if algo in ("kl_q", "psi") else 0)
    )


def test_taken_action_values_equal_the_full_logits_gathered():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 9, bias=True)
    hidden = torch.randn(6, 4)
    actions = torch.randint(0, 9, (6,))
    full = head(hidden).gather(1, actions[:, None]).squeeze(1)
    assert torch.allclose(kl_control.taken_action_values(hidden, head, actions), full, atol=1e-6)


def test_huber_loss_only_counts_masked_positions():
    q = torch.tensor([[0.0, 5.0, 1.0]])
    y = torch.tensor([[0.5, -100.0, 1.0]])
    mask = torch.tensor([[True, False, True]])
    naive = sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in (-0.5, 0.0)) / 2
    assert float(kl_control.huber_td_loss(q, y, mask, 1.0)) == pytest.approx(naive)


def test_mc_dropout_target_is_the_minimum_over_samples_in_one_batched_pass():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(5, 8)
    plain = kl_control.mc_dropout_values(hidden, head, "logsumexp", 1, 0.3)
    assert torch.allclose(plain, torch.logsumexp(head(hidden), -1))
    torch.manual_seed(3)
    lower = kl_control.mc_dropout_values(hidden, head, "logsumexp", 5, 0.3)
    # the same masks drawn by hand: one (M, N, H) dropout, then the minimum
    torch.manual_seed(3)
    noisy = torch.nn.functional.dropout(hidden.unsqueeze(0).expand(5, 5, 8), 0.3, True)
    assert torch.allclose(lower, torch.logsumexp(head(noisy), -1).min(0).values, atol=1e-6)
    torch.manual_seed(3)
    chunked = kl_control.mc_dropout_values(hidden, head, "logsumexp", 5, 0.3, max_elements=1)
    assert chunked.shape == (5,) and torch.isfinite(chunked).all()


def test_batches_are_a_pure_function_of_seed_and_step_and_split_across_processes():
    from learner.config import TrainConfig
    from learner.data import Window
    from learner.train import batch_for_step

    windows = [Window([i], [False], [0.0], [TERMINAL], [0.0], i) for i in range(10)]
    config = TrainConfig(batch_size=2, seed=3)
    ids = [[w.conversation_id for w in batch_for_step(windows, s, config)] for s in range(10)]
    assert ids == [
        [w.conversation_id for w in batch_for_step(windows, s, config)] for s in range(10)
    ]
    assert sorted(i for batch in ids[:5] for i in batch) == list(range(10))  # an epoch
    whole = [w.conversation_id for w in batch_for_step(windows, 0, config, 0, 1)]
    assert len(whole) == 2
    parts = [
        [w.conversation_id for w in batch_for_step(windows, 0, config, r, 2)] for r in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == 2 and not set(parts[0]) & set(parts[1])
