"""bot_question: does the bot ask something?

Scores: the bot turn. Formula: 1.0 if the turn contains a question mark (the full-width
？ and the Spanish ¿ too; not one inside a URL or `code`), or one of its sentences (split
at . ! ? ; : and line breaks, after an opening "oh", "hmm", "but", ...) has the syntax of
a question, else 0.0. Jaques et al. 2019 ("asking questions"), the signal their batch-RL
models learned to exploit, so evaluation also watches its rate.

Question syntax, whatever the sentence ends with (chat drops the "?"): an auxiliary then
a subject ("do you", "is it", "have you"; not the imperative "do it"), an interrogative
then an auxiliary ("what is", "how was", "who would", "which one do you"; not "which is",
a relative clause in chat), "what's", "how many/much/long", "what makes you", "what about
you". Only when the sentence does not end in "." or "!": "what if", "what kind of", "how
about", "why not go", a bare "why". Not questions (measured on the chitchat corpus, where
the old opening-word rule called 2,787 turns without a "?" questions): exclamations
("What a game that was!", "How lovely."), clauses ("Where we used to live, winters were
long", "When I was 11, ..."), "Why not, I'll come", "so do I".

>>> from rewards.context import Context
>>> bot_question([Context("What do you do for fun"), Context("I like cats."), Context("really?")])
[1.0, 0.0, 1.0]
"""

from __future__ import annotations

import re

from rewards.context import Context

AUX = (
    r"(?:do|does|did|are|is|am|was|were|can|could|would|will|should|have|has|had|shall|may"
    r"|might|must)"
)
SUBJECT = r"(?:you|i|we|they|he|she|it|there|that|this|your|anyone|someone|u|ya)"
NOT_SUBJECT = r"(?!(?:i|we|they|he|she|it|you|people|u|there|this|that)\b)"
WH = r"(?:what|why|how|who|whom|whose|where|when|which)"
# Words a chat sentence opens with before its question: "oh", "hmm", "but wait", ...
LEAD = (
    r"(?:(?:oh|hmm+|and|but|well|ok(?:ay)?|wait|yeah|yes|no|hey|hi|also|anyway|btw|lol"
    r"|haha\w*)[,\s]+)*"
)
ALWAYS = re.compile(
    rf"^{LEAD}(?:(?!do\s+(?:it|that|this)\b){AUX}\s+{SUBJECT}\b"  # do you, is it, not "do it"
    rf"|(?!which){WH}(?:\s+{NOT_SUBJECT}[\w']+)?\s+{AUX}\b"  # what is, who would, how long is
    rf"|{WH}(?:\s+[\w']+){{0,3}}\s+{AUX}\s+{SUBJECT}\b"  # what kind of things do you
    rf"|{WH}(?:'s|'re|'d|'ll)\b|what\s+up\b"  # what's, where'd, what up
    r"|what\s+\w+s\s+you\b|(?:how|what)\s+about\s+(?:you|u)\b"  # what makes you
    r"|how\s+(?:many|much|long|often|old|far|come)\b)",
    re.IGNORECASE,
)
UNLESS_ENDED = re.compile(
    rf"^{LEAD}(?:(?:how|what)\s+about|what\s+(?:kinds?|sorts?|types?)\s+of|what\s+if"
    r"|why\s+not\s+\w|why$)\b",
    re.IGNORECASE,
)
HIDDEN = re.compile(r"https?://\S+|www\.\S+|`[^`]*`")  # a "?" in these asks nothing
SENTENCE = re.compile(r"[^.!?\n:;]+[.!?]*")


def asks(text: str) -> bool:
    text = HIDDEN.sub(" ", text)
    if re.search(r"[?？¿]", text):
        return True
    for sentence in SENTENCE.findall(text):
        s = sentence.strip().lstrip("\"'(*-•>").strip()
        if ALWAYS.search(s) or (UNLESS_ENDED.search(s) and not s.endswith((".", "!"))):
            return True
    return False


def bot_question(contexts: list[Context]) -> list[float]:
    return [1.0 if asks(c.bot) else 0.0 for c in contexts]
