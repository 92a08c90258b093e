"""user_reply_latency: how long the user took to answer the bot turn.

Scores: the next user turn's timing. Formula: ln(1 + s), with s the seconds from the bot
turn to the user's reply, clipped to [0, 600] (beyond ten minutes the user was away, not
slow), so in [0, ln 601 ≈ 6.4]; 0 without a reply, and 0 on imported and simulated
conversations, whose timestamps are not when anyone answered (only live chats, terminal
and Discord, have real ones). Engagement research on deployed chat bots reads reply time
either way (quick answers from an engaged user, or a long message that took a while to
type), so it is logged and reported, and weighted 0 by default.

>>> from rewards.context import Context
>>> user_reply_latency([Context("x", next_user="hi", reply_seconds=0.0),
...                     Context("x", next_user="hi", reply_seconds=3600.0), Context("x")])
[0.0, 6.398594934535208, 0.0]
"""

from __future__ import annotations

import math

from rewards.context import Context

CLIP_SECONDS = 600.0


def user_reply_latency(contexts: list[Context]) -> list[float]:
    return [
        math.log1p(min(max(c.reply_seconds, 0.0), CLIP_SECONDS))
        if c.next_user is not None and c.reply_seconds is not None
        else 0.0
        for c in contexts
    ]
