"""The settings, one dataclass per TOML table of ``data/rapport.toml``: each field with its
type, default and help text, each table with its own ``validate()``. Loading, precedence
and the one-line errors are in :mod:`bot.config`, which also exports these classes."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from bot.errors import ConfigError
from bot.processes import ProcessSettings


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class StoreConfig:
    path: str = _help(
        "SQLite database file; empty means $RAPPORT_HOME/rapport.db.",
        "",
    )
    busy_timeout_s: float = _help(
        "How long a write waits for another process's write lock before failing "
        "(seconds). Writes are short, so 30 s only runs out if something hangs.",
        30.0,
    )

    def validate(self) -> None:
        require(self.busy_timeout_s >= 0, "store.busy_timeout_s must be >= 0")


@dataclass
class ModelConfig:
    path: str = _help(
        "Model to serve: empty for the default SmolLM2-135M-Instruct, a local Hugging "
        "Face folder, or a registered model version.",
        "",
    )
    context_tokens: int = _help(
        "Token budget of the prompt (system prompt + recent turns); older turns are "
        "dropped first. SmolLM2 was trained with 8k, 2k keeps CPU latency low.",
        2048,
    )
    system_prompt: str = _help(
        "The system prompt every conversation starts with.",
        "You are a friendly, curious conversation partner. Keep replies short and "
        "natural, like a person chatting.",
    )

    serve_precision: str = _help(
        "Weights used for serving on CPU: int8 (int8 weights, bf16 compute: ~3x faster "
        "than fp32 on 2 cores with unchanged reply quality, see bench/RESULTS.md), bf16 "
        "or fp32. CUDA always serves bf16; training always uses fp32 (bf16 on CUDA).",
        "int8",
    )

    def validate(self) -> None:
        require(self.context_tokens >= 64, "model.context_tokens must be >= 64")
        require(
            self.serve_precision in ("int8", "bf16", "fp32"),
            "model.serve_precision must be one of int8, bf16, fp32",
        )


@dataclass
class GenerationConfig:
    temperature: float = _help(
        "Sampling temperature; 0 means greedy decoding.",
        0.7,
    )
    top_p: float = _help("Nucleus sampling: keep the smallest token set with this mass.", 0.9)
    max_new_tokens: int = _help("Longest reply in tokens.", 96)
    repetition_penalty: float = _help(
        "Penalty > 1 discourages repeating tokens already in the context "
        "(small models loop without it).",
        1.1,
    )
    best_of: int = _help(
        "Sample this many replies at once and send the one the learned reward ranks "
        "highest (best-of-N, as Chai 2023 deployed it); 1 is off. Needs a reward model "
        "(`rapport reward-model train`); without one the bot replies with one sample.",
        1,
    )
    best_of_caution: float = _help(
        "Best-of-N ranks by mean - caution x spread of the reward ensemble, so a reply the "
        "members disagree on is not chosen for one lucky high score.",
        1.0,
    )

    def validate(self) -> None:
        require(self.temperature >= 0, "generation.temperature must be >= 0")
        require(0 < self.top_p <= 1, "generation.top_p must be in (0, 1]")
        require(self.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1")
        require(self.repetition_penalty > 0, "generation.repetition_penalty must be > 0")
        require(1 <= self.best_of <= 16, "generation.best_of must be in [1, 16]")
        require(self.best_of_caution >= 0, "generation.best_of_caution must be >= 0")


@dataclass
class WeightsConfig:
    """Weight of each normalised reward signal in the combined reward (0 leaves it out).

    Defaults: the user's reactions (sentiment, laughter) and on-topic replies
    (embedding similarity), the signals Jaques et al. 2019 found to track human ratings,
    weigh 1; the engagement and bot-side signals 0.5 (the paper's models learned to
    exploit questions, so they never dominate); explicit votes 2, because a person said
    so; repetition 1, since it is a penalty (more repetition, lower value). A retry is as
    explicit as a 👎, so user_retry weighs -2: the signal is 1 on a retried reply, and
    the negative weight makes it a penalty. A reply the safety filter withdrew is the
    strongest "not that" of all, so bot_unsafe weighs -3. user_rating weighs 0 until ratings are
    common enough to trust (see its module), and so does user_reply_latency, whose sign
    is unclear (a quick answer, or a long one that took time to type).
    """

    user_sentiment: float = _help("Weight of user_sentiment.", 1.0)
    user_sentiment_transition: float = _help("Weight of user_sentiment_transition.", 0.5)
    user_laughter: float = _help("Weight of user_laughter.", 1.0)
    user_reply_length: float = _help("Weight of user_reply_length.", 0.5)
    user_continued: float = _help("Weight of user_continued (the user replied, per turn).", 0.5)
    user_retry: float = _help(
        "Weight of user_retry (1 on a reply the user retried): negative, a penalty.", -2.0
    )
    user_reply_latency: float = _help(
        "Weight of user_reply_latency (log seconds until the user replied, live chats "
        "only); 0: which way it points is unclear (rewards/user_reply_latency.py).",
        0.0,
    )
    user_rating: float = _help(
        "Weight of user_rating (the end-of-chat rating, on the last bot turn); 0 until "
        "ratings are common and agree with the other signals (rewards/user_rating.py).",
        0.0,
    )
    bot_question: float = _help("Weight of bot_question.", 0.5)
    bot_sentiment: float = _help("Weight of bot_sentiment.", 0.5)
    bot_repetition: float = _help("Weight of bot_repetition (a penalty, <= 0).", 1.0)
    word_similarity: float = _help("Weight of word_similarity.", 0.5)
    embedding_similarity: float = _help("Weight of embedding_similarity.", 1.0)
    manual_vote: float = _help("Weight of manual_vote (explicit votes).", 2.0)
    bot_unsafe: float = _help(
        "Weight of bot_unsafe (1 on a reply the safety filter withdrew): a strong penalty.",
        -3.0,
    )

    def validate(self) -> None:
        require(any(dataclasses.astuple(self)), "[weights]: at least one weight must be non-zero")


@dataclass
class ScoringConfig:
    batch_conversations: int = _help(
        "Conversations scored (and committed) per batch by `rapport score`; a kill loses "
        "at most one batch of work.",
        256,
    )

    idle_minutes: float = _help(
        "A live conversation with no turn for this long has ended: `rapport score` marks it "
        "so, and its last bot turn, unanswered, then counts as the end of the conversation "
        "(until then it is not scored). The user's next message starts a new conversation.",
        60.0,
    )

    def validate(self) -> None:
        require(self.batch_conversations >= 1, "scoring.batch_conversations must be >= 1")
        require(self.idle_minutes > 0, "scoring.idle_minutes must be > 0")


@dataclass
class GateConfig:
    """``rapport deploy``: what a candidate must show before it replaces the served model.

    The candidate and the deployed version play the same seeded simulated users
    (``rapport eval``); the candidate passes when every check holds.
    """

    conversations: int = _help("Simulated conversations per model in the gate's eval.", 16)
    turns: int = _help("Bot turns per simulated conversation.", 4)
    seed: int = _help("Seed of the simulated users and of the sanity prompts.", 0)
    reward_margin: float = _help(
        "Elicited combined reward may fall at most this far (z-units) below the deployed "
        "version's, beyond the noise: refused if candidate upper bound + margin < deployed.",
        0.0,
    )
    max_kl_to_prior: float = _help(
        "Largest KL(candidate || prior) per token, in nats, on the simulated conversations.",
        1.0,
    )
    min_diversity_ratio: float = _help(
        "distinct-2 must be at least this share of the deployed version's.", 0.75
    )
    max_question_rate: float = _help(
        "Largest share of bot turns that ask a question (the paper's exploit collapse).", 0.9
    )
    max_repeated_replies: float = _help(
        "Largest share of replies that repeat another reply word for word.", 0.25
    )
    min_sane_replies: float = _help(
        "Share of the fixed sanity prompts that must get a sane reply (non-empty, mostly "
        "words, no chat-template markup).",
        0.8,
    )

    def validate(self) -> None:
        require(self.conversations >= 1, "gate.conversations must be >= 1")
        require(self.turns >= 1, "gate.turns must be >= 1")
        for name in ("min_diversity_ratio", "max_question_rate", "max_repeated_replies"):
            require(0 <= getattr(self, name) <= 1, f"gate.{name} must be between 0 and 1")
        require(0 <= self.min_sane_replies <= 1, "gate.min_sane_replies must be in [0, 1]")
        require(self.max_kl_to_prior >= 0, "gate.max_kl_to_prior must be >= 0")


@dataclass
class SafetyConfig:
    """The reply safety filter (bot/safety.py): a reply the local offensive-language
    model flags is regenerated once, else replaced by ``fallback``; the flagged reply is
    logged withdrawn and scored ``bot_unsafe``. The user's own text is never filtered."""

    enabled: bool = _help(
        "Check every reply before it is sent (chat, Discord, `rapport simulate`). 4-9 ms "
        "a reply; the terminal then shows a reply whole instead of streaming it.",
        True,
    )
    threshold: float = _help(
        "Flag a reply whose offensive-language probability is at least this (0-1). 0.9 "
        "flags insults, slurs, strong swearing and threats; ordinary replies score < 0.3.",
        0.9,
    )
    fallback: str = _help(
        "The neutral line sent when the regenerated reply is flagged too.",
        "Sorry, I'd rather not say that. Could we talk about something else?",
    )

    def validate(self) -> None:
        require(0 < self.threshold <= 1, "safety.threshold must be in (0, 1]")
        require(bool(self.fallback.strip()), "safety.fallback must not be empty")


@dataclass
class DiscordConfig:
    """``rapport discord``. The token is never a config value: it comes from the
    DISCORD_TOKEN environment variable or from the file named here."""

    token_file: str = _help("File holding the bot token (used when DISCORD_TOKEN is not set).", "")
    allowed_channels: str = _help(
        "Comma-separated channel ids where the bot answers mentions and replies; empty "
        "means every channel it can see. DMs are always answered.",
        "",
    )
    message_content_intent: bool = _help(
        "Use the privileged message-content intent (enable it in the developer portal "
        "too). Off: the bot still sees DMs, mentions and replies to it.",
        False,
    )
    idle_minutes: int = _help(
        "A conversation ends after this many idle minutes; the next message starts anew.",
        30,
    )
    rate_limit_per_minute: int = _help(
        "Messages a user may send the bot per minute before being asked to slow down.", 6
    )
    sharded: bool = _help("Use AutoShardedClient (for bots in many servers).", False)
    replies_at_once: int = _help(
        "Replies generated at the same time; later ones wait their turn (the typing "
        "indicator shows meanwhile). On a CPU more at once only slows each one and "
        "starves the event loop.",
        1,
    )

    def validate(self) -> None:
        require(self.idle_minutes >= 1, "discord.idle_minutes must be >= 1")
        require(self.replies_at_once >= 1, "discord.replies_at_once must be >= 1")
        require(self.rate_limit_per_minute >= 1, "discord.rate_limit_per_minute must be >= 1")
        for part in self.allowed_channels.split(","):
            require(
                not part.strip() or part.strip().isdecimal(),  # "²" is a digit, not a number
                f"discord.allowed_channels must be channel ids, got {part.strip()!r}",
            )

    def channel_ids(self) -> set[int]:
        return {int(p) for p in self.allowed_channels.split(",") if p.strip()}


@dataclass
class ProcessesConfig:
    """Sharing the machine (bot/processes.py): batch commands (every command but ``chat``
    and ``discord``: train, retrain, score, eval, simulate, reward-model train, deploy's
    gate) yield the cores to the bot that serves people. bench/colocation_bench.py
    measures these settings against torch's defaults."""

    batch_nice: int = _help(
        "Niceness of batch commands, 0-19 (higher yields more; 0 leaves it as started). "
        "19: they use the cores only when the bot does not, and all of them when it is idle.",
        19,
    )
    batch_threads: int = _help(
        "torch threads of a batch command; 0 is torch's default (one per core, or "
        "OMP_NUM_THREADS when set).",
        0,
    )
    serve_threads: int = _help(
        "torch threads of `rapport chat` and `rapport discord`; 0 is torch's default.", 0
    )
    batch_passive_wait: bool = _help(
        "OpenMP threads of batch commands sleep while they wait instead of spinning "
        "(OMP_WAIT_POLICY=PASSIVE; an OMP_WAIT_POLICY you set is kept): spinning threads of "
        "two processes on the same cores take turns burning CPU for nothing.",
        True,
    )
    batch_keep_freed: bool = _help(
        "glibc's malloc keeps the memory a batch command frees, instead of handing it back "
        "to the kernel and faulting it in again at the next training step (the test suite's "
        "toy trainings 1.4-1.8x faster, SmolLM2's steps 0-13%); its RSS stays at its peak "
        "until it ends. Linux (glibc) only.",
        True,
    )
    serve_passive_wait: bool = _help(
        "The same for `rapport chat` and `rapport discord`. Off: between the ~200 small "
        "matmuls of a token a waiting thread spins briefly, since waking a sleeping one "
        "may cost more than the matmul; beside batch work at a high niceness the bot's "
        "threads get the cores anyway. bench/colocation_bench.py measures both.",
        False,
    )

    def validate(self) -> None:
        require(0 <= self.batch_nice <= 19, "processes.batch_nice must be in [0, 19]")
        cores = os.cpu_count() or 1
        for name in ("batch_threads", "serve_threads"):
            require(
                0 <= getattr(self, name) <= 4 * cores,
                f"processes.{name} must be in [0, {4 * cores}] (0: one per core; "
                f"this machine has {cores})",
            )

    def settings(self, kind: str) -> ProcessSettings:
        """What a ``"serving"`` or ``"batch"`` process applies (bot.processes.apply)."""
        if kind == "serving":
            return ProcessSettings(0, self.serve_threads, self.serve_passive_wait)
        return ProcessSettings(
            self.batch_nice, self.batch_threads, self.batch_passive_wait, self.batch_keep_freed
        )
