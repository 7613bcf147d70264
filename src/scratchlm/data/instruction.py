"""Instruction data in the three forms users bring, read into one shape, and turned into token rows.

**Forms** (detected from the first record's keys; every record must have the same form):

* ``alpaca``: ``{"instruction", "input" (optional), "output"}`` (Raschka ch. 7, Stanford Alpaca);
* ``completion``: ``{"prompt", "completion"}`` strings (TRL's prompt-completion form): the prompt
  is used as written, with no chat template, and the completion gets the end-of-text token;
* ``chat``: ``{"messages": [{"role", "content"}, ...]}`` (TRL's conversational form, OpenAI's
  finetuning files): every assistant turn is a target, and the last turn is the assistant's.

A file is a JSON list of records or JSON Lines.  Every problem is a one-line ``DataError`` naming
the file and record.

**Rows.**  An example becomes token ids and, beside them, which tokens are *targets* (learned).
Alpaca and chat examples are chat messages rendered with a ``PromptStyle``'s Jinja template; the
text of assistant turn *i* is what the template adds between rendering the first *i* messages
with the generation prompt (what ``chat`` and the server render at inference) and rendering
them with turn *i* (its content and the end of turn: ``<|im_end|>``, or the end-of-text token of
Alpaca and Phi-3).  Each piece is tokenized on its own, so the ids of a prompt are exactly the
ids inference feeds for the same conversation.  A template that re-renders earlier turns
differently once a later one exists (some strip reasoning from past turns) has no such split,
and is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from scratchlm.errors import DataError, UserError
from scratchlm.prompts import PromptStyle, check_messages, instruction_messages, render_chat
from scratchlm.tokenizers import Tokenizer

FORMS = ("alpaca", "completion", "chat")
T = TypeVar("T")

_FORM_HINT = ('give records as {"instruction", "input", "output"}, {"prompt", "completion"} or '
              '{"messages": [{"role", "content"}, ...]}')


@dataclass(frozen=True)
class Example:
    """One record of an instruction file, checked: its form, its fields, and where it came from."""

    form: str
    record: Mapping[str, Any]
    where: str  # "FILE:N", for error messages

    def messages(self, style: PromptStyle) -> list[dict[str, Any]]:
        """The conversation as chat messages (alpaca: the style's user turn; chat: as given)."""
        if self.form == "alpaca":
            return instruction_messages(self.record, style)
        return [dict(m) for m in self.record["messages"]]

    def reference(self) -> str:
        """The answer the data gives for the last turn (what test responses are compared with)."""
        if self.form == "alpaca":
            return self.record["output"]
        if self.form == "completion":
            return self.record["completion"]
        return self.record["messages"][-1]["content"]

    def summary(self) -> dict[str, str]:
        """``instruction``, ``input`` and ``reference`` of a test response record, whatever the form."""
        if self.form == "alpaca":
            asked = {"instruction": self.record["instruction"], "input": self.record.get("input") or ""}
        elif self.form == "completion":
            asked = {"instruction": self.record["prompt"], "input": ""}
        else:
            users = [m["content"] for m in self.record["messages"][:-1] if m["role"] == "user"]
            asked = {"instruction": users[-1] if users else "", "input": ""}
        return {**asked, "reference": self.reference()}


def read_records(path: str | Path) -> list[tuple[Any, str]]:
    """The records of a JSON list or a JSON Lines file, each with its ``FILE:N`` location (the item's
    number in a list, the line's in JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", "check the path given to --data")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path} cannot be read as UTF-8 text ({err})", "pass a JSON or JSONL file") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}",
                            "fix the file, or write one JSON record per line (JSONL)") from None
        return [(row, f"{path}:{i}") for i, row in enumerate(rows, 1)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{n}"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n} is not valid JSON: {err.msg}",
                            "write one JSON record per line, or the whole file as a JSON list") from None
    return out


def detect_form(record: Any, where: str) -> str:
    """The form of a record, from its keys."""
    if isinstance(record, Mapping):
        if "messages" in record:
            return "chat"
        if "prompt" in record and "completion" in record:
            return "completion"
        if "instruction" in record:
            return "alpaca"
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: a record with keys {keys} is not instruction data", _FORM_HINT)
    raise DataError(f"{where}: a record must be a JSON object, not {type(record).__name__}", _FORM_HINT)


def _text(record: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> None:
    value = record.get(key)
    if optional and value is None:
        return
    if not isinstance(value, str):
        got = "is missing" if key not in record else f"is a {type(value).__name__}"
        raise DataError(f"{where}: {key!r} {got}, not a string", _FORM_HINT)


def check_example(record: Any, form: str, where: str) -> Example:
    """A record checked against its form: required strings present, a non-empty answer, a chat
    that ends with the assistant's turn and uses known roles."""
    if detect_form(record, where) != form:
        raise DataError(f"{where}: this record is {detect_form(record, where)} data, the file's first "
                        f"is {form}",
                        "keep one form per file")
    if form == "alpaca":
        for key in ("instruction", "output"):
            _text(record, key, where)
        _text(record, "input", where, optional=True)
        answer = record["output"]
    elif form == "completion":
        for key in ("prompt", "completion"):
            _text(record, key, where)
        answer = record["completion"]
    else:
        try:
            messages = check_messages(record["messages"])
        except UserError as err:
            raise DataError(f"{where}: {err.what}", err.fix or _FORM_HINT) from None
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the chat's last turn is the {messages[-1]['role']}'s, not the "
                            "assistant's",
                            "end each chat with the assistant's answer (the turn the model learns)")
        if messages[0]["role"] == "assistant":
            raise DataError(f"{where}: the chat starts with the assistant's turn",
                            "start each chat with a system or user turn")
        record = {**record, "messages": messages}
        answer = messages[-1]["content"]
    if not answer.strip():
        raise DataError(f"{where}: the answer is empty", "remove the record or give it an answer")
    return Example(form, record, where)


def read_examples(path: str | Path) -> list[Example]:
    """Every record of an instruction file, checked (see the module docstring)."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path} holds no records", "pass a file with instruction data")
    form = detect_form(*records[0])
    return [check_example(record, form, where) for record, where in records]


def book_split(examples: Sequence[T], fractions: Sequence[float] = (0.85, 0.05, 0.10)
               ) -> tuple[list[T], list[T], list[T]]:
    """``(train, val, test)`` in file order as Raschka ch. 7 cuts it: the first ``train`` fraction,
    then the ``test`` fraction, then the rest is validation (1,100 → 935 / 55 / 110).  Instruction
    examples and preference pairs alike."""
    train_fraction, val_fraction, test_fraction = fractions
    if min(fractions) < 0 or train_fraction <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {','.join(map(str, fractions))} must be ≥ 0 and add up to 1",
                        "e.g. --split 0.85,0.05,0.1 (train, validation, test)")
    n_train = int(len(examples) * train_fraction)
    n_test = int(len(examples) * test_fraction)
    train = list(examples[:n_train])
    return train, list(examples[n_train + n_test:]), list(examples[n_train:n_train + n_test])


# ----------------------------------------------------------------------------------------------
# Token rows
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRow:
    """An example's token ids and, for each, whether it is a target (a token the model learns)."""

    ids: list[int]
    target: list[bool]


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special="all") if text else []


def render_pieces(messages: Sequence[Mapping[str, Any]], style: PromptStyle, tokenizer: Tokenizer,
                  where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_turn)`` pieces (module docstring)."""
    tokens = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(messages[:i], style.template, add_generation_prompt=True, **tokens)
        turn = render_chat(messages[:i + 1], style.template, add_generation_prompt=False, **tokens)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise DataError(f"{where}: the {style.name} template renders earlier turns differently once "
                            "later ones follow, so its assistant turns cannot be cut out",
                            "use --template chatml or alpaca, whose turns only append")
        pieces += [(prompt[len(done):], False), (turn[len(prompt):], True)]
        done = turn
    return pieces


def encode_example(example: Example, style: PromptStyle, tokenizer: Tokenizer) -> TokenRow:
    """The token ids of an example and which of them are targets (module docstring)."""
    if example.form == "completion":
        eos = tokenizer.eos_id
        if eos is None:
            raise DataError("the tokenizer has no end-of-text token to end each completion with",
                            "use a tokenizer with an eos token, or chat data with a template")
        prompt = _encode(tokenizer, example.record["prompt"])
        answer = _encode(tokenizer, example.record["completion"]) + [eos]
        return TokenRow(prompt + answer, [False] * len(prompt) + [True] * len(answer))
    ids: list[int] = []
    target: list[bool] = []
    for text, is_answer in render_pieces(example.messages(style), style, tokenizer, example.where):
        piece = _encode(tokenizer, text)
        ids += piece
        target += [is_answer] * len(piece)
    return TokenRow(ids, target)


def prompt_ids(example: Example, style: PromptStyle, tokenizer: Tokenizer) -> list[int]:
    """What a model continues to answer the example's last turn: the conversation before it,
    rendered with the generation prompt (exactly what ``chat`` feeds), or a completion's prompt."""
    if example.form == "completion":
        return _encode(tokenizer, example.record["prompt"])
    messages = example.messages(style)[:-1]
    text = render_chat(messages, style.template, add_generation_prompt=True,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    return _encode(tokenizer, text)
