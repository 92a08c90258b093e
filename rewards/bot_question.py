"""bot_question: does the bot ask something?

Scores: the bot turn. Formula: 1.0 if the turn contains a question mark (also the
full-width ？ and the Spanish ¿) or a sentence opens with an interrogative ("what",
"how", "do you", ...), else 0.0. Jaques et al. 2019 ("asking questions"), the signal
their batch-RL models learned to exploit, so evaluation also watches its rate.

>>> from rewards.context import Context
>>> bot_question([Context("What do you do for fun"), Context("I like cats."), Context("really?")])
[1.0, 0.0, 1.0]
"""

from __future__ import annotations

import re

from rewards.context import Context

INTERROGATIVE_OPENING = re.compile(
    r"(?:^|[.!;:]\s+)(?:what|why|how|who|whom|whose|where|when|which|"
    r"(?:do|does|did|are|is|was|were|can|could|would|will|should|have|has|had|shall|may)"
    r"\s+(?:you|i|we|they|he|she|it|there|that|this|your|anyone|someone))\b",
    re.IGNORECASE,
)


def asks(text: str) -> bool:
    return bool(re.search(r"[?？¿]", text) or INTERROGATIVE_OPENING.search(text.strip()))


def bot_question(contexts: list[Context]) -> list[float]:
    return [1.0 if asks(c.bot) else 0.0 for c in contexts]
