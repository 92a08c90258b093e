"""conversation_length: the user keeps talking after this bot turn.

Scores: the rest of the conversation. Formula: log(1 + user turns after this bot turn).
Jaques et al. 2019 ("conversation length"); the log keeps the first few turns of
engagement worth more than the fiftieth. End of conversation: 0.

>>> from rewards.context import Context
>>> conversation_length([Context("x", user_turns_after=0), Context("x", user_turns_after=3)])
[0.0, 1.3862943611198906]
"""

from __future__ import annotations

import math

from rewards.context import Context


def conversation_length(contexts: list[Context]) -> list[float]:
    return [math.log1p(max(c.user_turns_after, 0)) for c in contexts]
