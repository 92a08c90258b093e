"""The KL-control targets against naive per-token loops on tiny random tensors."""

from __future__ import annotations

import pytest
import torch

from learner import kl_control
from learner.data import TERMINAL

B, T, V = 2, 7, 5
GAMMA, C = 0.9, 0.5


def naive_lambda_returns(step, next_value, target_q, mask, next_pos, lam):
    """Y_t one token at a time, recursing forward into the turn (memoised)."""
    memo = {}

    def y(b, t):
        if (b, t) not in memo:
            out = float(step[b, t]) + GAMMA * float(next_value[b, t])
            n = int(next_pos[b, t])
            if n == t + 1 and n < T and bool(mask[b, n]):
                out += GAMMA * lam * (y(b, n) - float(target_q[b, n]))
            memo[b, t] = out
        return memo[b, t]

    return torch.tensor([[y(b, t) if mask[b, t] else 0.0 for t in range(T)] for b in range(B)])


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_lambda_returns_match_a_naive_recursion_with_turn_ends_and_terminals(lam):
    torch.manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = False  # the user's turn between two bot turns
    mask[1, 6] = False  # padding
    next_pos = torch.arange(1, T + 1).repeat(B, 1)
    next_pos[0, 2] = 4  # the turn's end bootstraps across the user's reply
    next_pos[1, 5] = TERMINAL  # the conversation ends
    next_pos[:, T - 1] = TERMINAL
    step, target_q = torch.randn(B, T), torch.randn(B, T)
    next_value = kl_control.bootstrap(torch.randn(B, T), next_pos)
    got = kl_control.lambda_returns(step, next_value, target_q, mask, next_pos, GAMMA, lam)
    want = naive_lambda_returns(step, next_value, target_q, mask, next_pos, lam)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    # one-step at lam = 0; at a turn's end, always R + γ V'(s_next)
    assert float(got[0, 2]) == pytest.approx(float(step[0, 2] + GAMMA * next_value[0, 2]))
    if lam == 0:
        assert torch.allclose(got[mask], (step + GAMMA * next_value)[mask], atol=1e-6)


@pytest.mark.parametrize("algo", ["kl_q", "psi", "g", "batch_q"])
def test_values_are_zero_at_the_prior_for_every_algorithm_but_batch_q(algo):
    """The zero-reward fixed point: with the prior's own logits, V(s) = 0 and
    R + γV − Q = 0 for every action (batch_q excepted: it has no prior to sit at)."""
    torch.manual_seed(4)
    logits = torch.randn(3, V) * 3 + 7  # an arbitrary per-state offset included
    lse = torch.logsumexp(logits, -1)
    logp = logits - lse[:, None]
    top = logp.max(-1).values
    value = kl_control.value_from_logits(logits, lse, top, algo)
    q = kl_control.q_from_logit(logits, lse[:, None], logp, algo)
    step = kl_control.step_reward(torch.zeros(3, V), logp, 1.0, algo)
    residual = step - q  # next value 0 (shown above for the others)
    if algo == "batch_q":
        assert not torch.allclose(residual, torch.zeros_like(residual))
    else:
        assert torch.allclose(value, torch.zeros(3), atol=1e-5)
        assert torch.allclose(residual, torch.zeros_like(residual), atol=1e-5)


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


def test_mc_dropout_perturbs_only_the_deviation_from_the_prior():
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 11, bias=False)
    prior_hidden = torch.randn(5, 8) * 10
    lowest = lambda logits, a, b: torch.logsumexp(logits, -1).min(0).values  # noqa: E731
    plain = torch.logsumexp(head(prior_hidden), -1)
    at_prior = kl_control.mc_dropout_logits(prior_hidden, prior_hidden, head, 5, 0.3, lowest)
    assert torch.allclose(at_prior, plain, atol=1e-5)  # no deviation: no noise, exact
    moved = prior_hidden + torch.randn(5, 8)
    torch.manual_seed(3)
    lower = kl_control.mc_dropout_logits(moved, prior_hidden, head, 5, 0.3, lowest)
    torch.manual_seed(3)  # the same masks drawn by hand, on the deviation only
    noisy = prior_hidden + torch.nn.functional.dropout(
        (moved - prior_hidden).unsqueeze(0).expand(5, 5, 8), 0.3, True
    )
    assert torch.allclose(lower, torch.logsumexp(head(noisy), -1).min(0).values, atol=1e-5)
    chunked = kl_control.mc_dropout_logits(moved, prior_hidden, head, 5, 0.3, lowest, 1)
    assert chunked.shape == (5,) and torch.isfinite(chunked).all()  # one position a chunk
    one = kl_control.mc_dropout_logits(moved, prior_hidden, head, 1, 0.3, lowest)
    assert torch.allclose(one, torch.logsumexp(head(moved), -1), atol=1e-5)


def test_the_huber_threshold_never_caps_a_reward():
    assert kl_control.huber_delta(1.0, 3.0, 1.0) == 3.0
    assert kl_control.huber_delta(1.0, 3.0, 0.25) == 12.0
    assert kl_control.huber_delta(20.0, 3.0, 1.0) == 20.0


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


def _perturbed(folder, seed: int, scale: float = 0.05):
    from bot.policy import load_model

    model, _ = load_model(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def _oracle_loss(algo, windows, q, target, prior, config, heads=(None, None)):
    """The loss straight from the formulas in learner.kl_control, one unpadded window
    at a time, every value over the full vocabulary in float64. With value ``heads``
    (q's, target's): the dueling form, whose logits ℓ̃ = log_softmax ℓ + V(s) + b(s)
    stand in the raw form's ℓ in every formula."""
    errors = []
    for w in windows:
        ids = torch.tensor([w.input_ids])
        with torch.no_grad():
            out = [m(input_ids=ids, output_hidden_states=True) for m in (q, target, prior)]
            logits = [o.logits[0].double() for o in out]
            b = torch.logsumexp(logits[2], -1)
            for k, head in enumerate(heads):
                if head is not None:
                    hidden = out[k].hidden_states[-1][0]
                    value = torch.nn.functional.layer_norm(hidden, hidden.shape[-1:])
                    value = head.linear(value).squeeze(-1).double()
                    logits[k] = torch.log_softmax(logits[k], -1) + (value + b)[:, None]
        errors += _window_errors(algo, w, *logits, config)
    errors = torch.tensor(errors)
    return float(torch.nn.functional.huber_loss(errors, torch.zeros_like(errors), delta=100.0))


def _window_errors(algo, w, lq, lt, lp, config):
    """Q(s,a) − Y for every trained position of one window."""
    logp_all = torch.log_softmax(lp, -1)  # (T, V) log p(·|s)
    b = torch.logsumexp(lp, -1)  # (T,)
    actions = w.input_ids[1:] + [0]

    def q_of(logits, t, a):
        value = float(logits[t, a] - b[t])
        return value - float(logp_all[t, a]) if algo == "g" else value

    def v_target(n):
        if n == TERMINAL:
            return 0.0
        if algo == "psi":
            return float(torch.logsumexp(lt[n] - b[n], -1))
        if algo == "g":  # log Σ_a p(a|s') exp G'(s', a), G' = ℓ' − b − log p
            g = lt[n] - b[n] - logp_all[n]
            return float(torch.log((logp_all[n].exp() * g.exp()).sum()))
        top = float((lt[n] - b[n]).max())
        return top - float(logp_all[n].max()) if algo == "kl_q" else top

    memo = {}

    def y(t):
        if t not in memo:
            r = w.reward[t] / config.reward_scale
            if algo in ("psi", "kl_q"):
                r += float(logp_all[t, actions[t]])
            out = r + config.gamma * v_target(w.next_pos[t])
            n = w.next_pos[t]
            if n == t + 1 and n < len(w.input_ids) and w.mask[n]:
                out += config.gamma * config.td_lambda * (y(n) - q_of(lt, n, actions[n]))
            memo[t] = out
        return memo[t]

    return [q_of(lq, t, actions[t]) - y(t) for t in range(len(w.input_ids)) if w.mask[t]]


@pytest.mark.parametrize("dueling", [False, True], ids=["raw", "dueling"])
@pytest.mark.parametrize("algo", ["psi", "g", "kl_q", "batch_q"])
def test_kl_control_loss_equals_a_full_vocabulary_oracle_on_a_tiny_model(
    algo, dueling, tiny_model_dir
):
    """Padding (two windows of different lengths), a bootstrap across the user's reply
    into the next bot turn, a cut reply, a terminal turn, and g in its own terms; in
    the raw form (Q from ℓ − b) and the dueling form (Q from log π + V_φ, each network
    with its own value head)."""
    from transformers import AutoTokenizer

    from learner.config import TrainConfig
    from learner.data import Dataset, add_prior_logprobs, collate, conversation_windows
    from learner.train import Models, ValueHead, kl_control_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def turn(role, text, reward=None, cut=False):
        return {"id": 0, "role": role, "author": "model", "text": text, "reward": reward,
                "cut": cut}  # fmt: skip

    long = {"id": 1, "turns": [
        turn("user", "hi there"), turn("bot", "hello, how are you?", 1.0),
        turn("user", "fine"), turn("bot", "that is so", -0.5, cut=True),
        turn("user", "ok"), turn("bot", "bye now", 0.3),
    ]}  # fmt: skip
    short = {"id": 2, "turns": [turn("user", "yo"), turn("bot", "hey?", 2.0)]}
    windows = [w for c in (long, short) for w in conversation_windows(tokenizer, "s", c, 256)]
    assert len({len(w.input_ids) for w in windows}) == 2  # padding in the batch
    assert TERMINAL in [w.next_pos[t] for w in windows for t, m in enumerate(w.mask) if m]

    prior = _perturbed(tiny_model_dir, 0, 0.0)
    add_prior_logprobs(Dataset(windows, [], {}), prior)
    q, target = _perturbed(tiny_model_dir, 1), _perturbed(tiny_model_dir, 2)
    config = TrainConfig(algo=algo, gamma=0.9, td_lambda=0.7, reward_scale=0.5, huber_delta=100)
    batch = collate(windows, tokenizer.pad_token_id)
    heads = (None, None)
    if dueling:  # value heads away from their zero start, different for q and target
        heads = tuple(ValueHead(q.config.hidden_size) for _ in range(2))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for head in heads:
                for p in head.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    got, _ = kl_control_loss(Models(q, target, prior, *heads), batch, config)
    want = _oracle_loss(algo, windows, q, target, prior, config, heads)
    assert float(got.detach()) == pytest.approx(want, rel=1e-4)
    assert want > 1e-3  # the perturbed networks are far from any fixed point
