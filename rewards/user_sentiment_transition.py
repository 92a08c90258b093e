"""user_sentiment_transition: did the bot turn lift the user's mood?

Scores: the change around the bot turn. Formula: VADER(next user turn) − VADER(user turn
the bot answered), in [-2, 2]. Jaques et al. 2019 use sentiment alone; the transition
credits the bot for the change it caused rather than for a user who was cheerful anyway.
0 when either user turn is missing.

>>> from rewards.context import Context
>>> c = Context("Want a hug?", prev_user="I feel awful", next_user="thanks, that helps :)")
>>> user_sentiment_transition([c])[0] > 1
True
"""

from __future__ import annotations

from rewards.context import Context
from rewards.text import sentiment


def user_sentiment_transition(contexts: list[Context]) -> list[float]:
    return [
        sentiment(c.next_user) - sentiment(c.prev_user)
        if c.next_user is not None and c.prev_user is not None
        else 0.0
        for c in contexts
    ]
