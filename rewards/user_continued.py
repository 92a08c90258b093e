"""user_continued: did the user go on talking after this bot turn?

Scores: the next user turn. Formula: 1.0 if the user replied to this bot turn, 0.0 if
the conversation ended with it. Chai's engagement reward ("the user continued") and the
per-turn form of Jaques et al. 2019's conversation length: the learner's discounted
return sums it over the turns that follow, so a long conversation is worth more without
any turn counting the rest of the conversation again (the old ``conversation_length``,
log(1 + user turns left), was a reward-to-go used as an immediate reward, and its
z-score told the position in the conversation, not what the bot said). A turn of a live
conversation that the user has not answered yet is not scored (rewards.score.contexts_of).

>>> from rewards.context import Context
>>> user_continued([Context("x", next_user="sure!"), Context("x", next_user=None)])
[1.0, 0.0]
"""

from __future__ import annotations

from rewards.context import Context


def user_continued(contexts: list[Context]) -> list[float]:
    return [0.0 if c.next_user is None else 1.0 for c in contexts]
