"""user_reply_length: how much the user writes back.

Scores: the next user turn. Formula: min(words in the reply, 30). Engagement: people
write more to a bot they enjoy (a signal of Jaques et al. 2019's conversation-length
family); the cap keeps one pasted essay from dominating. No reply: 0.

>>> from rewards.context import Context
>>> user_reply_length([Context("x", next_user="oh wow that is so cool"), Context("x")])
[6.0, 0.0]
"""

from __future__ import annotations

from rewards.context import Context
from rewards.text import words

CAP = 30


def user_reply_length(contexts: list[Context]) -> list[float]:
    return [float(min(len(words(c.next_user)), CAP)) for c in contexts]
