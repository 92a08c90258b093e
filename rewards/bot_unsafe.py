"""bot_unsafe: did the safety filter withdraw this reply before anyone saw it?

Scores: the bot turn's fate. Formula: 1.0 if the reply safety filter
(:mod:`bot.safety`) flagged it as offensive and it was withdrawn (regenerated, or
replaced by the neutral fallback), else 0.0. It reads the flag logged with the reply
when it was generated (``generation.unsafe``), not the text again: the event is what
happened at send time, under the threshold of the day. A strong negative, weighted
below zero in the combined reward, so the learner is taught away from what the filter
catches (Jaques et al. 2019 deployed their bots with profanity masked; BlenderBot 3,
Shuster et al. 2022, checked every reply with safety classifiers before sending).

>>> from rewards.context import Context
>>> bot_unsafe([Context("x", replaced=True, unsafe=True), Context("x", replaced=True)])
[1.0, 0.0]
"""

from __future__ import annotations

from rewards.context import Context


def bot_unsafe(contexts: list[Context]) -> list[float]:
    return [1.0 if c.unsafe else 0.0 for c in contexts]
