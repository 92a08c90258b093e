"""End-of-chat ratings: a mixin of :class:`bot.store.Store`, like
:mod:`bot.store_data`, using only the store's ``_write()`` and ``_read()`` helpers.

A rating is a whole number 1-5 for each of the questions of the human evaluation of
Jaques et al. 2019 (overall quality, fluency, diversity, relatedness, empathy), given
by the user at the end of a chat; one set per conversation, a second replaces the first.
"""

from __future__ import annotations

from bot.errors import InvalidInput, NotFound, OptedOut
from bot.store_data import now

RATING_QUESTIONS = ("overall", "fluency", "diversity", "relatedness", "empathy")


class Ratings:
    def rate(self, conversation_id: int, user_id: str, answers: dict[str, int]) -> bool:
        """Store ``user_id``'s end-of-chat rating of a conversation: an int 1-5 for each of
        :data:`RATING_QUESTIONS`. A second rating replaces the first; returns whether it
        did."""
        if set(answers) != set(RATING_QUESTIONS) or any(
            isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5
            for v in answers.values()
        ):
            raise InvalidInput(
                f"a rating is a whole number 1-5 for each of {', '.join(RATING_QUESTIONS)}"
            )
        with self._write() as db:
            opted = db.execute("SELECT opted_out FROM users WHERE id = ?", [user_id]).fetchone()
            if opted is None:
                raise NotFound(f"no user {user_id}")
            if opted[0]:
                raise OptedOut("you opted out of logging; your ratings are not stored")
            if not db.execute(
                "SELECT 1 FROM conversations WHERE id = ?", [conversation_id]
            ).fetchone():
                raise NotFound(f"no conversation {conversation_id} to rate")
            replaced = bool(
                db.execute(
                    "SELECT 1 FROM ratings WHERE conversation_id = ?", [conversation_id]
                ).fetchone()
            )
            db["ratings"].upsert(
                {
                    "conversation_id": conversation_id,
                    "user_id": user_id,
                    **{q: answers[q] for q in RATING_QUESTIONS},
                    "created": now(),
                },
                pk="conversation_id",
            )
        return replaced

    def rating(self, conversation_id: int) -> dict[str, int] | None:
        rows = self._read(
            f"SELECT {', '.join(RATING_QUESTIONS)} FROM ratings WHERE conversation_id = ?",
            [conversation_id],
        )
        return rows[0] if rows else None

    def rating_summary(self) -> tuple[int, dict[str, float]]:
        """(how many conversations are rated, {question: mean answer})."""
        means = ", ".join(f"AVG({q}) AS {q}" for q in RATING_QUESTIONS)
        row = self._read(f"SELECT COUNT(*) AS n, {means} FROM ratings")[0]
        return row["n"], {q: row[q] for q in RATING_QUESTIONS} if row["n"] else {}

    def rated_turns(self) -> dict[int, float]:
        """{bot message id: its conversation's mean rating answer} over the rated
        conversations' own bot turns (replies a retry replaced left out)."""
        mean = " + ".join(f"r.{q}" for q in RATING_QUESTIONS)
        rows = self._read(
            f"""
            SELECT m.id, ({mean}) / {float(len(RATING_QUESTIONS))} AS rating
            FROM ratings r JOIN messages m ON m.conversation_id = r.conversation_id
            WHERE m.role = 'bot' AND m.replaced_by IS NULL
            """
        )
        return {row["id"]: row["rating"] for row in rows}
