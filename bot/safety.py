"""The reply safety filter: a reply a local offensive-language model flags is not sent.

Design
------
- The classifier is ``alt-profanity-check`` (a linear SVM over character and word
  n-grams, calibrated to a probability; its model ships inside the wheel, so nothing is
  downloaded at run time). Jaques et al. 2019 deployed their bots with profanity masked;
  BlenderBot 3 ran safety classifiers on every reply before sending it. The check runs
  on the whole reply: the terminal shows a reply only once it has passed (a spinner
  until then), Discord never streamed, and best-of-N checks every candidate before
  ranking them (:mod:`bot.session`).
- Cost, measured on this 2-core machine under load (load average 4-6): a check takes
  4-9 ms a reply, and a batch of 4 candidates about the same (one call). Loading the
  classifier takes 1-2 s (scikit-learn, which nothing else on the chat path imports). It loads on
  the first check, in the thread that checks, so ``rapport chat`` starts no later and
  the first reply pays the load once. Not on a background thread during start-up: in a
  run of the pty test of tests/test_terminal.py with that import beside the tiny
  model's reply, Ctrl-C did not stop the reply within 60 s (not investigated further);
  the second saved once is not worth that risk.
- Threshold (``safety.threshold``, default 0.9), chosen by trying the model on everyday
  chat replies and offensive ones: ordinary replies score 0.005-0.25 ("I hate waiting
  in line too." 0.51, "Let's kill some time" 0.54); insults, slurs and strong swearing
  score 0.99-1.0; "I hate you" 0.91, "Kill yourself" 0.95, "What the hell" 0.93 are
  flagged at 0.9 while "Damn, that's a tough one" (0.89) and "Bloody brilliant" (0.72)
  pass. The model is word-based: "Oh no, that sucks" scores 0.999 and is flagged.
- What a flag does (:meth:`bot.session.Session.respond`): the reply is regenerated
  once; if the new one is flagged too, ``safety.fallback`` (a neutral line) is sent.
  Every flagged reply is logged as a withdrawn bot turn, replaced by the next, with
  :func:`flag_record` in its generation settings: ``rapport score`` gives it
  ``bot_unsafe`` = 1 (a strong negative weight) and no ``user_retry`` (the user never
  saw it). The user's own text is never checked: it is logged as written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import metadata

from bot.config import SafetyConfig

# texts -> the probability that each is offensive
Classifier = Callable[[list[str]], list[float]]
PACKAGE = "alt-profanity-check"


def profanity_classifier() -> Classifier:
    """alt-profanity-check's ``predict_prob`` (loads its model from the wheel)."""
    from profanity_check import predict_prob  # scikit-learn: ~1 s, see module doc

    return lambda texts: [float(p) for p in predict_prob(texts)]


class SafetyFilter:
    """Scores replies with a classifier and says which are flagged (``>= threshold``).

    ``classifier`` defaults to :func:`profanity_classifier`, loaded on first use; safe to
    share between threads (Discord's sessions)."""

    def __init__(
        self,
        threshold: float,
        fallback: str,
        classifier: Classifier | None = None,
        name: str | None = None,
    ) -> None:
        self.threshold = threshold
        self.fallback = fallback
        self._classifier = classifier
        self.name = name or (f"{PACKAGE} {metadata.version(PACKAGE)}" if not classifier else "")
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: SafetyConfig) -> SafetyFilter | None:
        """The configured filter; None when disabled."""
        return cls(config.threshold, config.fallback) if config.enabled else None

    def _load(self) -> Classifier:
        if self._classifier is not None:
            return self._classifier
        with self._lock:  # one load, whichever thread checks first
            if self._classifier is None:
                self._classifier = profanity_classifier()
            return self._classifier

    def scores(self, texts: list[str]) -> list[float]:
        """The classifier's probability that each text is offensive (0 for empty text)."""
        kept = [i for i, t in enumerate(texts) if t.strip()]
        out = [0.0] * len(texts)
        if kept:
            for i, p in zip(kept, self._load()([texts[i] for i in kept]), strict=True):
                out[i] = p
        return out

    def flagged(self, score: float) -> bool:
        return score >= self.threshold

    def flag_record(self, score: float) -> dict:
        """What a withdrawn reply's generation settings record of why (``unsafe``)."""
        return {"score": round(score, 4), "threshold": self.threshold, "by": self.name}
