"""Errors a user can act on.

Every exception here carries a message written for a person, not a developer: the CLI
prints it as one line (``rapport: error: ...``) and exits non-zero, with no traceback.
Anything else that escapes is a bug and keeps its traceback.
"""


class RapportError(Exception):
    """Base class: the message is one readable line that says what to do."""


class ConfigError(RapportError):
    """The config file, a RAPPORT_* variable or a --set flag is wrong."""


class StoreError(RapportError):
    """The database cannot be opened, is locked, or refused a write."""


class InvalidInput(StoreError):
    """Input that cannot be logged as given (empty text, bad vote value, ...)."""


class NotFound(StoreError):
    """A message, conversation, user or model that does not exist."""


class OptedOut(StoreError):
    """The user opted out of logging; nothing of theirs may be written."""
