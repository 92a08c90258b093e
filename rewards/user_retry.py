"""user_retry: did the user ask for another reply instead of this one?

Scores: the bot turn's fate. Formula: 1.0 if the user retried it (``/retry`` in the
terminal, 🔁 on Discord: the reply stays in the log, replaced by a new one), else 0.0.
A strong negative, weighted below zero in the combined reward: asking for another
answer is the plainest "not that" a user gives without typing one, and the regenerate
button is how deployed chat bots collect it (Ouyang et al. 2022 rank several replies to
one prompt; a retry ranks the new reply over the old). The (kept, replaced) pair also
trains DPO directly (``--pairs-from retries``). A reply the safety filter withdrew is replaced
too, but not by the user, who never saw it: it scores 0 here (``bot_unsafe`` instead).

>>> from rewards.context import Context
>>> user_retry([Context("x", replaced=True), Context("x", next_user="ok")])
[1.0, 0.0]
>>> user_retry([Context("x", replaced=True, unsafe=True)])
[0.0]
"""

from __future__ import annotations

from rewards.context import Context


def user_retry(contexts: list[Context]) -> list[float]:
    return [1.0 if c.replaced and not c.unsafe else 0.0 for c in contexts]
