"""Progress of long work, with an ETA, on a terminal and in a log file alike.

On a terminal this is click's progress bar. Written to a file or a pipe, click's bar
prints only its label, so a 30-minute ``rapport eval`` looked dead in a log: here a
line ``label: 12/200 (6%), 1m05s elapsed, ETA 17m00s`` is written at most every
``every`` seconds, and once at the end.
"""

from __future__ import annotations

import sys
import time

import click


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class LineProgress:
    """The non-terminal bar: the same ``update``/``current_item`` as click's."""

    def __init__(self, length: int, label: str, file, every: float, item_show_func=None):
        self.length, self.label, self.file, self.every = length, label, file, every
        self.item_show_func = item_show_func
        self.pos = self.shown_pos = 0
        self.current_item = None
        self.began = self.shown = time.monotonic()

    def __enter__(self) -> LineProgress:
        print(f"{self.label}: 0/{self.length}", file=self.file, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.pos != self.shown_pos:
            self._show()

    def update(self, n: int) -> None:
        self.pos += n
        if time.monotonic() - self.shown >= self.every:
            self._show()

    def _show(self) -> None:
        self.shown, self.shown_pos = time.monotonic(), self.pos
        elapsed = self.shown - self.began
        line = f"{self.label}: {self.pos}/{self.length}"
        if self.length:
            line += f" ({100 * self.pos / self.length:.0f}%), {_clock(elapsed)} elapsed"
            if 0 < self.pos < self.length:
                line += f", ETA {_clock(elapsed * (self.length - self.pos) / self.pos)}"
        if self.item_show_func and (item := self.item_show_func(self.current_item)):
            line += f", {item}"
        print(line, file=self.file, flush=True)


def progress(length: int, label: str, *, every: float = 10.0, item_show_func=None):
    """A progress bar with an ETA for ``length`` units of work, on stderr."""
    if sys.stderr.isatty():
        return click.progressbar(
            length=length,
            label=label,
            file=sys.stderr,
            show_pos=True,
            show_eta=True,
            item_show_func=item_show_func,
        )
    return LineProgress(length, label, sys.stderr, every, item_show_func)
