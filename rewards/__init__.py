"""Reward signals scored from the logs (Jaques et al. 2019, "Way Off-Policy Batch Deep RL
of Implicit Human Preferences in Dialog", section 5: implicit human rewards).

Design
------
- One module a signal. A reward is a plain, batched function from a list of
  :class:`rewards.context.Context` (one per bot turn: the user turn it answers, the bot
  turn, the user's reply, the bot's earlier turns, the votes) to a list of floats, with a
  stable ``__name__`` that is the reward's name in the ``rewards`` table.
- :mod:`rewards.suite` is the explicit list of signals; :mod:`rewards.combine`
  normalises each signal (z-score over the scored logs, stored) and weights them;
  :mod:`rewards.score` scores the store incrementally, in batches.
- Rewards never normalise or weight themselves, and a bot turn with no user reply
  (the end of a conversation) gets a defined value from every signal, never NaN.
"""
