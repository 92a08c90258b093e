"""What every ``rapport`` command shares (:mod:`bot.loop.cli`, :mod:`bot.loop.cli_records`):
the one way to open the store, to load a model for batched self-play, and to say what an
interrupted command kept; numbers and names for people."""

from __future__ import annotations

import getpass

from bot.config import Config
from bot.store import Store


def open_store(config: Config) -> Store:
    """The one way every command opens the database."""
    return Store(config.database_path(), busy_timeout_s=config.store.busy_timeout_s)


def served(config: Config, store: Store, spec: str):
    """(model, tokenizer, version) of a model spec for batched self-play: served in
    :func:`bot.policy.batch_precision` (bf16 where the CPU has it natively, else fp32)
    where the chat serves int8, because the int8 weight-only kernel is built for one-row
    decoding and is 1.6x slower than bf16 on batched generation (measured here)."""
    from bot.policy import batch_precision, load_model, prepare_for_serving, resolve_model_path

    registered = {m["version"]: m["path"] for m in store.models()}
    model, tokenizer = load_model(resolve_model_path(spec, registered))
    precision = config.model.serve_precision
    precision = batch_precision() if precision == "int8" else precision
    return prepare_for_serving(model, precision), tokenizer, spec or "prior"


# What a command that is interrupted (Ctrl-C) has kept, said on the way out.
ON_INTERRUPT: dict[str, str] = {}


def on_interrupt(message: str) -> None:
    """Say ``message`` if this command is interrupted: what is saved, how to go on."""
    ON_INTERRUPT["message"] = message


def plural(n: int, noun: str) -> str:
    """'1 bad line', '2 bad lines'."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def size(n: float) -> str:
    """Bytes for people: 512 B, 2.2 GB (powers of 1000, as df -H)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def login_name(who: str | None) -> str:
    return who or getpass.getuser()
