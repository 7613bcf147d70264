"""Chat with a model in the terminal: streaming answers through its chat template, with history.

Type a message and press Enter.  /reset forgets the conversation, /save FILE writes it as JSON,
/help lists the commands.  Ctrl-C stops the answer being written; Ctrl-D quits.
"""

# How the session works (kept out of the docstring above, which is the command's --help):
# the whole conversation (and the --system message) is sent every turn, so the model sees the
# history; once it outgrows the model's context, the oldest exchanges are left out of what is sent
# (the system message stays, and /save still writes everything).  A message the model cannot take
# (too long alone, or characters its vocabulary lacks) is an error line, and the chat goes on.
# The REPL lives here, not in serving/: it is a terminal front over LM.chat_stream, as `generate`
# is over LM.stream; serving/ is the engine and the HTTP server, which it does not use.

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from scratchlm.checkpoint.atomic import write_json_atomic
from scratchlm.cli.options import add_model_options, add_sampling_options, load_model, sampling_from_args
from scratchlm.errors import UserError
from scratchlm.generation.sampling import SamplingParams


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_options(parser, temperature=0.7, top_p=0.9, stop=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = sampling_from_args(args)
    lm = load_model(args)
    ChatSession(lm, params, system=args.system).run()
    return 0


HELP = """commands:
  /reset       forget the conversation (the system message stays)
  /save FILE   write the conversation to FILE as JSON (a list of role/content messages)
  /help        show this help
  /quit        quit (so does Ctrl-D); Ctrl-C stops an answer"""


class ChatSession:
    """The conversation so far and how to answer the next message; the REPL is ``run``."""

    def __init__(self, lm: Any, params: SamplingParams, system: str | None = None,
                 out: TextIO = sys.stdout):
        self.lm = lm
        self.params = params
        self.system = system
        self.out = out
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.left_out = 0  # the oldest messages after the system message, no longer sent

    def save(self, path: str) -> Path:
        target = Path(path).expanduser()
        write_json_atomic(target, self.messages)
        return target

    def answer(self, text: str) -> str:
        """Stream the reply to ``text``; on Ctrl-C keep what was shown and return it."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in self.lm.chat_stream(self.sent_messages(), self.params):
                if not pieces:
                    piece = piece.lstrip()  # the template's newline after the role is not the answer
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        except UserError as err:  # raised before the first token: the message is not taken
            self.messages.pop()
            self.out.write(f"error: {err}\n")
            self.out.flush()
            return ""
        self.out.write("\n")
        self.out.flush()
        reply = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def sent_messages(self) -> list[dict[str, str]]:
        """The messages to send: all of them, or without the oldest exchanges once the prompt would
        leave less than a quarter of the context (or ``max_new_tokens``, if fewer) for the answer."""
        context = self.lm.config.context_length
        room = min(self.params.max_new_tokens, context // 4)
        first = 1 if self.system else 0

        def prompt_tokens(messages: list[dict[str, str]]) -> int:
            return len(self.lm.tokenizer.encode(self.lm.chat_prompt(messages), allowed_special="all"))

        start = first + self.left_out
        while start < len(self.messages) - 1 and prompt_tokens(
                self.messages[:first] + self.messages[start:]) + room > context:
            start += 1
            while start < len(self.messages) - 1 and self.messages[start]["role"] != "user":
                start += 1  # begin with a user turn: templates expect user/assistant alternation
        if start > first + self.left_out:
            self.left_out = start - first
            self.out.write(f"(the conversation outgrew the model's context of {context} tokens: "
                           f"the oldest {self.left_out} messages are no longer sent)\n")
        return self.messages[:first] + self.messages[start:]

    def command(self, line: str) -> bool:
        """Run a ``/command``; False when it asks to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.reset()
            self.out.write("(conversation cleared)\n")
        elif name == "/save":
            if not arg.strip():
                self.out.write("usage: /save FILE\n")
            else:
                try:
                    self.out.write(f"(saved {len(self.messages)} messages to {self.save(arg.strip())})\n")
                except OSError as err:
                    self.out.write(f"error: cannot write {arg.strip()}: {err.strerror}\n")
        elif name == "/help":
            self.out.write(HELP + "\n")
        else:
            self.out.write(f"unknown command {name}; /help lists them\n")
        self.out.flush()
        return True

    def run(self, prompt: str = ">>> ") -> None:
        """The read-answer loop, until Ctrl-D or /quit."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.out.write("chat: /help for commands, Ctrl-C stops an answer, Ctrl-D quits\n")
        while True:
            try:
                line = input(prompt)
            except EOFError:
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: drop the line, stay
                self.out.write("\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.answer(line)
