"""The loop on top: the ``rapport`` command, the gate, deploy and rollback.

These modules drive everything below them (README, "How it fits together"): the CLI runs
the chat, scoring, training and ``rapport retrain``; the gate evaluates a trained
version with the learner's evaluation; the registry switches the deployed version that
running bots follow. Nothing under ``bot/``, ``rewards/`` or ``learner/`` imports them
(tests/test_layers.py).
"""
