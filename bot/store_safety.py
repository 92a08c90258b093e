"""The reply safety filter's record in the logs: a mixin of :class:`bot.store.Store`,
like :mod:`bot.store_data`, using only the store's ``_read()`` helper.

A reply the filter withdrew is a bot turn with ``unsafe`` in its generation settings
(:mod:`bot.safety`); the neutral line sent after two flagged replies has ``fallback``.
"""

from __future__ import annotations


class SafetyStats:
    def safety_rates(self) -> dict[str, tuple[int, int]]:
        """{platform: (replies the filter withdrew, replies the model wrote)}: every bot
        turn the model wrote, withdrawn ones included (the fallback line is not the
        model's), on platforms where the bot itself spoke (live chats and self-play, not
        imported corpora)."""
        rows = self._read(
            """
            SELECT c.platform,
                   SUM(json_extract(m.generation, '$.unsafe') IS NOT NULL) AS flagged,
                   COUNT(*) AS replies
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE m.role = 'bot' AND m.author = 'model' AND m.generation IS NOT NULL
              AND json_extract(m.generation, '$.fallback') IS NULL
            GROUP BY c.platform ORDER BY c.platform
            """
        )
        return {r["platform"]: (int(r["flagged"]), int(r["replies"])) for r in rows}
