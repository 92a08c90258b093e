"""``rapport chat``: talk to the bot in a terminal.

Design
------
A thin loop over :class:`bot.session.Session`: read a line, run a slash command or
``session.respond``, print. Two modes, chosen by whether stdin is a terminal:

- interactive: a greeting that says how to vote, a ``you ›`` prompt with line editing,
  the reply streamed as it is generated (with the safety filter on, or best-of-N, a
  spinner until the whole reply is checked or chosen, then the reply), colours; Ctrl-C
  stops a reply mid-way and keeps the chat open, Ctrl-D (or ``/quit``) leaves;
- piped (scripts, tests): no greeting, prompts or colours; exactly one output line per
  input line (a reply's own line breaks become spaces), so output lines pair with input.

A line that starts with ``//`` is sent as a message starting with ``/``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from bot.errors import RapportError
from bot.session import CUT_MARK, RATING_PROMPTS, Reply, Session, parse_rating

HELP = """\
/up [N]     thumbs up the last reply (or the Nth-last)
/down [N]   thumbs down the last reply (or the Nth-last)
/retry      another reply instead of the last one (both are saved)
/rate       rate this conversation 1-5 on five questions (or /rate 4 5 3 4 4)
/new        start a new conversation
/model      show which model version is answering
/optout     stop logging your messages   /optin  allow it again
/forget     delete everything you have said and voted
/help       this list
/quit       leave (Ctrl-D works too); Ctrl-C stops a reply being written"""

GREETING = """\
Hi! I'm rapport, a chat bot that learns from how people react.
Rate my replies with /up or /down (/up 3 rates the 3rd-last), or ask for another with
/retry; /help lists commands.
Your messages are saved to improve the bot; /optout stops that, /forget deletes them."""


@dataclass
class Terminal:
    session: Session
    out: TextIO
    interactive: bool
    read_line: Callable[[str], str]

    def say(self, text: str, colour: str = "") -> None:
        if self.interactive and colour:
            text = f"\x1b[{colour}m{text}\x1b[0m"
        print(text, file=self.out, flush=True)

    def run(self) -> None:
        if self.interactive:
            self.say(GREETING, "2")
        while True:
            try:
                line = self.read_line("\x1b[1myou ›\x1b[0m " if self.interactive else "")
            except EOFError:
                self.session.end("eof")
                if self.interactive:
                    self.say("\nbye")
                return
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D or /quit leaves)", "2")
                continue
            line = line.rstrip("\r\n")
            if not line.strip():  # nothing to say, nothing logged
                if not self.interactive:
                    self.say("")  # piped: still one output line per input line
                continue
            if line.startswith("/") and not line.startswith("//"):
                if self.command(line) == "quit":
                    return
                continue
            self.chat(line[1:] if line.startswith("//") else line)

    def chat(self, text: str) -> None:
        self.show_reply(lambda on_text: self.session.respond(text, on_text=on_text))

    def show_reply(self, generate: Callable[[Callable[[str], None] | None], Reply]) -> None:
        """Run ``generate(on_text)`` (a reply or a retry) and show the reply: streamed
        when interactive, one line when piped; errors are one line."""
        streamed = self.interactive
        spinner = None
        if streamed:
            print("\x1b[36mrapport ›\x1b[0m ", end="", file=self.out, flush=True)
            best_of = getattr(self.session.policy_source(), "best_of", 1) > 1
            if best_of or self.session.safety is not None:
                # nothing is shown until best-of-N has chosen, or the filter has checked
                spinner = Spinner(self.out)

        def show(piece: str) -> None:
            if spinner:
                spinner.stop()
            print(piece, end="", file=self.out, flush=True)

        try:
            reply = generate(show if streamed else None)
        except KeyboardInterrupt:
            self.say(" [stopped]", "2")
            return
        except RapportError as e:
            if streamed:
                print(file=self.out)
            self.say(f"rapport: {e}", "31")
            return
        finally:
            if spinner:
                spinner.stop()
        if streamed:
            print("\x1b[2m" + CUT_MARK + "\x1b[0m" if reply.cut else "", file=self.out, flush=True)
        else:
            self.say(" ".join(reply.text.split()) + (CUT_MARK if reply.cut else ""))
        if self.session.notice:
            self.say(self.session.notice, "2")

    def command(self, line: str) -> str | None:
        name, *args = line.split()
        try:
            if name in ("/quit", "/exit"):
                self.session.end("quit")
                self.say("bye")
                return "quit"
            if name in ("/up", "/down"):
                back = int(args[0]) if args else 1
                value = 1 if name == "/up" else -1
                self.session.vote(value, back)
                which = "last reply" if back == 1 else f"reply {back} back"
                self.say(f"voted {'👍' if value > 0 else '👎'} on the {which}")
            elif name == "/retry":
                if args:
                    self.say("/retry takes no arguments: it replaces the last reply")
                    return None
                self.show_reply(lambda on_text: self.session.retry(on_text=on_text))
            elif name == "/rate":
                self.rate(args)
            elif name == "/new":
                self.session.new_conversation()
                self.say("(new conversation)")
            elif name == "/model":
                self.say(f"model: {self.session.policy_source().version}")
            elif name == "/optout":
                self.session.set_opt_out(True)
                self.say("Logging is off: nothing you say from now on is saved.")
            elif name == "/optin":
                self.session.set_opt_out(False)
                self.say("Logging is on again (new conversation).")
            elif name == "/forget":
                if self.interactive:
                    answer = self.read_line("Delete everything you have said and voted? [y/N] ")
                    if answer.strip().lower() not in ("y", "yes"):
                        self.say("kept")
                        return None
                deleted = self.session.forget_me()
                self.say(f"forgotten: {deleted['messages']} messages, {deleted['votes']} votes")
            elif name == "/help":
                self.say(HELP)
            else:
                self.say(f"unknown command {name}; /help lists them (// sends a leading /)")
        except ValueError:
            self.say(f"{name} takes a number of replies back, e.g. {name} 2")
        except RapportError as e:
            self.say(f"rapport: {e}", "31")
        return None

    def rate(self, args: list[str]) -> None:
        """/rate: five answers on the line, or (interactive) one question at a time."""
        if not args and self.interactive:
            self.say("Rate this conversation, 1 (poor) to 5 (great):", "2")
            try:
                args = [self.read_line(f"{prompt} ") for prompt in RATING_PROMPTS.values()]
            except (EOFError, KeyboardInterrupt):
                self.say("\n(not rated)", "2")
                return
        answers = parse_rating(args)
        replaced = self.session.rate(answers)
        said = ", ".join(f"{q} {v}" for q, v in answers.items())
        self.say(f"rated: {said}" + (" (replaces your earlier rating)" if replaced else ""))


class Spinner:
    """A spinner in place on the reply line until :meth:`stop` (from any thread)."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO, every: float = 0.1) -> None:
        self.out, self.every = out, every
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        frame = 0
        while not self.stopped.wait(self.every):
            with self.lock:
                if not self.stopped.is_set():
                    glyph = self.FRAMES[frame % len(self.FRAMES)]
                    print(f"\x1b[2m{glyph}\x1b[0m\b", end="", file=self.out, flush=True)
            frame += 1

    def stop(self) -> None:
        with self.lock:
            if self.stopped.is_set():
                return
            self.stopped.set()
            print(" \b", end="", file=self.out, flush=True)  # rub out the last frame
        self.thread.join()


def run_terminal(session: Session, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    interactive = stdin.isatty() and out.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        read_line = input
    else:

        def read_line(prompt: str) -> str:
            line = stdin.readline()
            if not line:
                raise EOFError
            return line

    Terminal(session, out, interactive, read_line).run()
