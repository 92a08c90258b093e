"""Each reward signal on labelled examples written for the test, one class a signal.

Every class covers: empty text, emoji only, 10,000-character text, non-English, a batch
of one and of many (batched and one-at-a-time scoring give identical values).
"""

from __future__ import annotations

import math

import pytest
import torch

from rewards import embedding
from rewards.bot_question import bot_question
from rewards.bot_repetition import bot_repetition
from rewards.bot_sentiment import bot_sentiment
from rewards.bot_unsafe import bot_unsafe
from rewards.context import Context
from rewards.embedding_similarity import embedding_similarity
from rewards.manual_vote import manual_vote
from rewards.suite import SIGNALS
from rewards.user_continued import user_continued
from rewards.user_laughter import user_laughter
from rewards.user_rating import user_rating
from rewards.user_reply_latency import user_reply_latency
from rewards.user_reply_length import user_reply_length
from rewards.user_retry import user_retry
from rewards.user_sentiment import user_sentiment
from rewards.user_sentiment_transition import user_sentiment_transition
from rewards.word_similarity import word_similarity

LONG = ("I went hiking in the mountains and it was lovely. " * 200)[:10_000]
ODD_CONTEXTS = [
    Context(bot="", prev_user="", next_user=""),
    Context(bot="😂😂😂", prev_user="🙂", next_user="🤣🤣"),
    Context(bot=LONG, prev_user=LONG, next_user=LONG, earlier_bot=(LONG,)),
    Context(bot="¿Cómo estás hoy?", prev_user="Hola amigo", next_user="jajaja muy bien"),
    Context(bot="今日は何をしましたか？", prev_user="こんにちは", next_user="wwww 楽しかった"),
    Context(bot="Hi there!"),  # end of conversation: no user reply, no prompt
    Context(bot="Hi there!", prev_user="hello", replaced=True),  # retried: no reply
    Context(bot="Shit, you idiot.", prev_user="hi", replaced=True, unsafe=True),  # withdrawn
    Context(bot="Bye!", prev_user="see you", rating=(5, 4, 3, 2, 1)),  # the rated last turn
    Context(bot="ok", prev_user="hi", next_user="hey", reply_seconds=-5.0),  # clock skew
]


def one_at_a_time(signal, contexts):
    return [signal([c])[0] for c in contexts]


@pytest.mark.parametrize("signal", SIGNALS, ids=lambda s: s.__name__)
def test_every_signal_is_finite_on_odd_input_and_batching_changes_nothing(signal, monkeypatch):
    monkeypatch.setattr(embedding, "PRECISION", "fp32")  # bf16 rounds per batch, see module
    batched = signal(ODD_CONTEXTS)
    assert len(batched) == len(ODD_CONTEXTS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in batched)
    single = one_at_a_time(signal, ODD_CONTEXTS)
    if signal is embedding_similarity:
        assert batched == pytest.approx(single, abs=1e-5)
    else:
        assert batched == single  # exactly
    assert signal([]) == []


def test_bf16_embedding_similarity_stays_within_its_precision_of_fp32(monkeypatch):
    bf16 = embedding_similarity(ODD_CONTEXTS)
    monkeypatch.setattr(embedding, "PRECISION", "fp32")
    assert bf16 == pytest.approx(embedding_similarity(ODD_CONTEXTS), abs=0.02)
    assert all(-1.0 <= v <= 1.0 for v in bf16)


@pytest.mark.skipif(embedding.BACKEND != "openvino", reason="openvino is not installed")
class TestOpenVinoBackend:
    TEXTS = [c.bot for c in ODD_CONTEXTS] + ["I just adopted a puppy!", "hi", "Hola amigo"]

    def test_matches_the_torch_fallback_in_fp32(self):
        fast = embedding.encoder("fp32", "openvino").encode(self.TEXTS)
        reference = embedding.encoder("fp32", "torch").encode(self.TEXTS)
        assert fast.shape == reference.shape == (len(self.TEXTS), 384)
        cosines = torch.nn.functional.cosine_similarity(fast, reference)
        assert cosines.min() > 0.9999

    def test_bf16_stays_close_to_the_torch_fallback(self):
        fast = embedding.encoder("bf16", "openvino").encode(self.TEXTS)
        reference = embedding.encoder("fp32", "torch").encode(self.TEXTS)
        assert torch.nn.functional.cosine_similarity(fast, reference).min() > 0.999

    @pytest.mark.fresh_models
    def test_the_model_is_converted_once_into_the_cache(self, rapport_home):
        folder = embedding.openvino_model_dir()
        converted = (folder / "model.xml").stat().st_mtime_ns
        assert folder.parent == rapport_home / "models"
        assert embedding.openvino_model_dir() == folder
        assert (folder / "model.xml").stat().st_mtime_ns == converted
        assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder


def test_signal_names_are_stable_and_unique():
    names = [s.__name__ for s in SIGNALS]
    assert len(set(names)) == len(names) == 15


class TestUserLaughter:
    LAUGHS = [
        "hahaha you got me",
        "LOL",
        "lmaooo that's wild",
        "ahahah",
        "hehe",
        "rofl",
        "😂",
        "that's funny 🤣",
        "jajaja",
        "kkkkk",
        "XD",
        "haha.",
        "lolol ok",
        "哈哈哈",
        "heh",  # spaced or varied laughter, found missing in the chitchat corpus
        "hehe nice",
        "ahah",
        "hah hah",
        "Ha ha, very funny",
        "bahahaha no way",
    ]
    NOT = [
        "that is what I have",
        "what?",
        "Hello",
        "ha",
        "",
        "😊",
        "the law of the land",
        "aloha",
        "shallow",
        "holy cow",
        "Haskell is a language",
        "LOLA is my cat's name",
        "aha, I see",
        "Hahn is a surname",
        "the",
        "he",
    ]

    @pytest.mark.parametrize("reply", LAUGHS)
    def test_laughter_scores_one(self, reply):
        assert user_laughter([Context("x", next_user=reply)]) == [1.0]

    @pytest.mark.parametrize("reply", NOT)
    def test_words_containing_ha_or_lol_score_zero(self, reply):
        assert user_laughter([Context("x", next_user=reply)]) == [0.0]

    def test_no_reply_and_long_text(self):
        assert user_laughter([Context("x"), Context("x", next_user=LONG + " haha")]) == [0.0, 1.0]


class TestBotQuestion:
    QUESTIONS = [
        "What do you do for fun",
        "how are you?",
        "Do you like dogs",
        "Really?",
        "I see. Why is that",
        "¿Qué tal?",
        "元気ですか？",
        "Are you okay",
        "Nice! Have you been there before",
        "Which one is your favourite",
        # chat drops the "?": questions by their syntax (found in the chitchat corpus)
        "yup\nhow are you",
        "hmm what should I tell you about",
        "What about you!",
        "Why did you say that.",
        "what kind of music",
        "is he cute",
        "what's your favourite film",
        "Argh that reminds me: have you seen it",
        "What makes you choose nursing",
    ]
    STATEMENTS = [
        "I like cats.",
        "That sounds fun!",
        "",
        "😂😂",
        "Whatever you say.",
        "I wonder about that.",
        "Somewhere over the rainbow.",
        "Hola amigo",
        "The question is hard.",
        LONG,
        # exclamations and clauses that open with an interrogative word
        "What a game that was!",
        "How lovely.",
        "Where we used to live, winters were long",
        "Why not, I'll come",
        "When I was 11, we moved to Utah",
        "How I met your mother is so funny",
        "which is kinda expensive",
        "so do I",
        "Do it now",
        # a "?" that asks nothing
        "see https://example.com/page?id=3",
        "in C you write `a ? b : c`",
    ]

    @pytest.mark.parametrize("bot", QUESTIONS)
    def test_questions(self, bot):
        assert bot_question([Context(bot)]) == [1.0]

    @pytest.mark.parametrize("bot", STATEMENTS)
    def test_statements(self, bot):
        assert bot_question([Context(bot)]) == [0.0]


class TestSentiment:
    POSITIVE = [
        "I love this, thank you!",
        "haha that's great",
        "Awesome :)",
        "yes!! so happy",
        "You're wonderful",
        "best day ever 😊",
        "nice",
        "cool, I like it",
        "Thanks a lot, that helps",
        "great idea",
    ]
    NEGATIVE = [
        "I hate this.",
        "that's awful",
        "you are boring",
        "ugh, terrible",
        "this is stupid",
        "I'm so sad",
        "worst answer ever",
        "no, that's wrong and bad",
        "shut up, idiot",
        "I feel horrible",
    ]

    @pytest.mark.parametrize("text", POSITIVE)
    def test_positive_replies_score_above_zero(self, text):
        assert user_sentiment([Context("x", next_user=text)])[0] > 0
        assert bot_sentiment([Context(text)])[0] > 0

    @pytest.mark.parametrize("text", NEGATIVE)
    def test_negative_replies_score_below_zero(self, text):
        assert user_sentiment([Context("x", next_user=text)])[0] < 0
        assert bot_sentiment([Context(text)])[0] < 0

    def test_empty_emoji_and_missing(self):
        assert user_sentiment([Context("x", next_user=""), Context("x")]) == [0.0, 0.0]

    def test_transition_is_the_change_in_mood(self):
        better = Context("x", prev_user="I feel terrible", next_user="thanks, much better :)")
        worse = Context("x", prev_user="I'm great!", next_user="that was rude, I hate it")
        same = Context("x", prev_user="ok", next_user="ok")
        values = user_sentiment_transition([better, worse, same, Context("x", prev_user="hi")])
        assert values[0] > 0.5 and values[1] < -0.5 and values[2] == 0.0 and values[3] == 0.0


class TestBotRepetition:
    def test_a_repetitive_reply_is_penalised_more(self):
        fresh = Context("Sure, tell me more about your trip to Spain!")
        loop = Context("I like it. I like it. I like it. I like it.")
        echo = Context("Tell me about your day", earlier_bot=("Tell me about your day",))
        values = bot_repetition([fresh, loop, echo])
        assert values[0] == 0.0
        assert values[1] < -0.3 and values[2] < -0.3
        assert values[1] < values[0] and values[2] < values[0]

    def test_more_repetition_is_a_larger_penalty(self):
        some = Context("cats are nice and cats are cute")
        lots = Context("cats cats cats cats cats cats cats")
        a, b = bot_repetition([some, lots])
        assert b < a < 0

    @pytest.mark.parametrize("text", ["", "😂😂😂", "ok", "¿Cómo estás?"])
    def test_short_or_wordless_replies_get_no_penalty(self, text):
        assert bot_repetition([Context(text)]) == [0.0]


class TestSimilarity:
    ON_TOPIC = [
        ("I just adopted a puppy!", "Congrats! Dogs make great companions."),
        ("My exam is tomorrow, I'm nervous", "Good luck on your test, studying helps!"),
        ("I love cooking Italian food", "Pasta and pizza are my favourite dishes too."),
        ("We went skiing last weekend", "Snow sports are fun, how were the slopes?"),
        ("I'm learning to play guitar", "Music is great, which songs do you practise?"),
    ]
    OFF_TOPIC = "The stock market closed lower on Tuesday amid tax concerns."

    @pytest.mark.parametrize("user, bot", ON_TOPIC)
    def test_on_topic_beats_off_topic(self, user, bot):
        on, off = embedding_similarity(
            [Context(bot, prev_user=user), Context(self.OFF_TOPIC, prev_user=user)]
        )
        assert on > off + 0.1

    def test_word_overlap_counts_content_words_only(self):
        values = word_similarity(
            [
                Context("Cats are great pets", prev_user="I love my cats"),
                Context("I am here and you are there", prev_user="I am with you"),
                Context("cats", prev_user="cats", next_user="dogs"),
                Context("cats"),
            ]
        )
        assert values == [0.25, 0.0, 0.5, 0.0]

    def test_no_user_turn_gives_zero(self):
        assert embedding_similarity([Context("hello")]) == [0.0]


class TestEngagement:
    def test_reply_length_counts_words_and_is_capped(self):
        values = user_reply_length(
            [Context("x", next_user="one two three"), Context("x", next_user=LONG), Context("x")]
        )
        assert values == [3.0, 30.0, 0.0]

    def test_user_continued_is_per_turn_whatever_comes_later(self):
        """1 when the user answered this turn, 0 when the conversation ended with it; how
        many turns follow does not count (the learner's return sums the later ones)."""
        values = user_continued(
            [Context("x", next_user="ok"), Context("x", next_user="ok"), Context("x")]
        )
        assert values == [1.0, 1.0, 0.0]


class TestUserRetry:
    def test_one_on_a_retried_reply_only(self):
        """The replaced reply carries the retry, whatever its text; the reply kept after
        it, one the user answered and one at the end of a conversation do not."""
        values = user_retry(
            [
                Context("Sure! 😂", prev_user="joke please", replaced=True),
                Context("", replaced=True),
                Context("x", prev_user="joke please", next_user="haha"),
                Context("x"),
            ]
        )
        assert values == [1.0, 1.0, 0.0, 0.0]

    def test_zero_on_a_reply_the_safety_filter_withdrew(self):
        """The filter replaced it, not the user, who never saw it (bot_unsafe instead)."""
        assert user_retry([Context("Shit.", prev_user="hi", replaced=True, unsafe=True)]) == [0.0]


class TestBotUnsafe:
    """bot_unsafe reads the filter's flag logged at send time, whatever the text."""

    def test_one_on_a_withdrawn_reply_only(self):
        values = bot_unsafe(
            [
                Context("Shit, you idiot.", prev_user="hi", replaced=True, unsafe=True),
                Context("", replaced=True, unsafe=True),  # empty text: the flag counts
                Context("Shit happens.", prev_user="hi", next_user="lol"),  # sent: not flagged
                Context("Hi there!", replaced=True),  # a user retry
            ]
        )
        assert values == [1.0, 1.0, 0.0, 0.0]

    def test_emoji_long_and_non_english_text_and_batches(self):
        contexts = [
            Context("😂😂😂", unsafe=True, replaced=True),
            Context(LONG, replaced=True, unsafe=True),
            Context("今日は何をしましたか？"),
        ]
        assert bot_unsafe(contexts) == [1.0, 1.0, 0.0]
        assert bot_unsafe(contexts[:1]) == [1.0] and bot_unsafe([]) == []


class TestUserReplyLatency:
    def test_log_seconds_clipped_at_ten_minutes_and_zero_without_a_timed_reply(self):
        values = user_reply_latency(
            [
                Context("x", next_user="hi", reply_seconds=9.0),
                Context("x", next_user="hi", reply_seconds=86_400.0),  # came back next day
                Context("x", next_user="hi", reply_seconds=-2.0),  # clocks disagree
                Context("x", next_user="hi"),  # an imported log: no real times
                Context("x", reply_seconds=None),  # no reply
            ]
        )
        assert values == [pytest.approx(math.log(10)), pytest.approx(math.log(601)), 0.0, 0.0, 0.0]


class TestUserRating:
    def test_the_mean_answer_mapped_to_minus_one_to_one_on_rated_turns_only(self):
        values = user_rating(
            [
                Context("x", rating=(5, 5, 5, 5, 5)),
                Context("x", rating=(1, 1, 1, 1, 1)),
                Context("x", rating=(3, 4, 2, 3, 3)),
                Context("x", rating=(4, 5, 4, 5, 4)),
                Context("x", next_user="lol"),
            ]
        )
        assert values == [1.0, -1.0, 0.0, pytest.approx(0.7), 0.0]


class TestManualVote:
    def test_mean_of_votes(self):
        assert manual_vote(
            [
                Context("x", votes=(1,)),
                Context("x", votes=(1, -1)),
                Context("x", votes=(-1, -1)),
                Context("x"),
            ]
        ) == [1.0, 0.0, -1.0, 0.0]
