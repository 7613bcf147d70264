"""Preference pairs for DPO: reading both data forms, splitting, and tokenizing as TRL does.

Two file forms, each item a prompt with a chosen and a rejected answer:

* **Raschka's** (ch. 7's DPO notebook): a JSON list (or JSONL) of ``{"instruction", "input",
  "chosen", "rejected"}``; the prompt is the instruction template applied to instruction + input
  (``prompts.format_prompt``, Alpaca by default, ending with its ``### Response:`` header), the
  answers are the completions.  With no prompt style, the entry becomes a chat (one user turn,
  instruction and input; one assistant turn) rendered like the next form.
* **TRL's**: JSONL (or a JSON list) of ``{"prompt", "chosen", "rejected"}``, either strings (the
  completions follow the prompt text as they are) or chat message lists, rendered with a Jinja
  chat template: the prompt is ``render(prompt, add_generation_prompt=True)`` and a completion is
  ``render(prompt + completion)[len(prompt):]`` (the rendered prompt must be a prefix of the
  rendered conversation).  Without ``"prompt"``, the prompt is the turns chosen and rejected share
  (TRL's ``extract_prompt``).

Tokenization follows TRL 1.16's ``DPOTrainer`` exactly: the prompt is tokenized alone and the
prompt + completion together (special-token strings in the text become their ids; no BOS is
added); the completion is what follows the longest prefix the tokenized prompt shares with both
tokenized conversations, and the prompt is that shared prefix.  Text completions get the end-of-text
token appended (unless they end with it already); rendered chats end with the template's own
end-of-turn and get nothing.  So a token that merges across the prompt/completion boundary belongs
to the completion, as in TRL (tests/test_dpo.py states it on a case where the two ways differ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scratchlm.errors import DataError
from scratchlm.tokenizers import Tokenizer

FORMS = 'write {"instruction", "input", "chosen", "rejected"} or {"prompt", "chosen", "rejected"}'
NONEMPTY = "give every chosen and rejected answer some text"


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and its two completions, as text; ``eos``: append the end-of-text token to each
    completion (text forms; a rendered chat ends with the template's end of turn)."""

    prompt: str
    chosen: str
    rejected: str
    eos: bool = True
    # what a test response record shows beside the model's answer: instruction, input, reference
    # (the chosen answer's text)
    summary: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass
class EncodedPair:
    """One pair as token ids; ``ref``: the reference model's (chosen, rejected) log-prob sums, once
    computed (``--precompute-ref``)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None
    source: PreferencePair | None = None  # the pair it was encoded from


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, Mapping) and "role" in m for m in value)


def _render_pair(prompt: list[dict[str, Any]], chosen: list[dict[str, Any]], rejected: list[dict[str, Any]],
                 template: str | None, tokens: Mapping[str, str | None], where: str) -> PreferencePair:
    from scratchlm.prompts import render_chat

    text = render_chat(prompt, template, add_generation_prompt=True, **tokens)
    completions = []
    for answer in (chosen, rejected):
        full = render_chat([*prompt, *answer], template, add_generation_prompt=False, **tokens)
        if not full.startswith(text):
            raise DataError(f"{where}: the chat template renders the prompt differently alone than in the "
                            "conversation, so the completion cannot be cut after it",
                            "use a chat template whose generation prompt is a prefix of the rendered chat")
        completions.append(full[len(text):])
    return PreferencePair(text, completions[0], completions[1], eos=False)


def _text(item: Mapping[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        got = "is missing" if key not in item else f"is a {type(value).__name__}"
        raise DataError(f"{where}: {key!r} {got}, not a string",
                        "each pair needs 'chosen' and 'rejected' (and 'instruction' or 'prompt')")
    return value


def to_pair(item: Any, where: str, *, style: str | None = "alpaca", chat_template: str | None = None,
            bos_token: str | None = None, eos_token: str | None = None) -> PreferencePair:
    """One item of either form as a ``PreferencePair`` (see the module docstring).

    ``style``: the prompt style of Raschka's form (``prompts.PROMPT_STYLES``); None renders it as
    a chat with ``chat_template`` (None: ChatML), as the chat form always is.
    """
    from scratchlm.prompts import format_prompt

    if not isinstance(item, Mapping):
        raise DataError(f"{where}: an item must be an object, not {type(item).__name__}",
                        FORMS)
    tokens = {"bos_token": bos_token, "eos_token": eos_token}
    chosen, rejected = item.get("chosen"), item.get("rejected")
    if _is_chat(chosen) and _is_chat(rejected):
        prompt = item.get("prompt")
        if prompt is None:  # the turns both share are the prompt (TRL's extract_prompt)
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not _is_chat(prompt):
            raise DataError(f"{where}: 'prompt' must be a list of messages when the answers are",
                            'write "prompt": [{"role": "user", "content": "..."}]')
        pair = _render_pair(list(prompt), list(chosen), list(rejected), chat_template, tokens, where)
        if any(not m.get("content") for m in (*chosen, *rejected)):
            raise DataError(f"{where}: an empty completion", NONEMPTY)
        users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
        return replace(pair, summary={"instruction": users[-1] if users else "", "input": "",
                                      "reference": str(chosen[-1].get("content"))})
    chosen, rejected = _text(item, "chosen", where), _text(item, "rejected", where)
    if not chosen.strip() or not rejected.strip():
        which = "chosen" if not chosen.strip() else "rejected"
        raise DataError(f"{where}: the {which} completion is empty", NONEMPTY)
    if "prompt" in item:
        prompt = _text(item, "prompt", where)
        return PreferencePair(prompt, chosen, rejected,
                              summary={"instruction": prompt, "input": "", "reference": chosen})
    if "instruction" not in item:
        raise DataError(f"{where}: neither 'instruction' nor 'prompt'",
                        FORMS)
    instruction, given = _text(item, "instruction", where), item.get("input") or ""
    summary = {"instruction": instruction, "input": given, "reference": chosen}
    if style is not None:
        return PreferencePair(format_prompt(item, style), chosen, rejected, summary=summary)
    user = [{"role": "user", "content": f"{instruction}\n\n{given}" if given else instruction}]
    return replace(_render_pair(user, [{"role": "assistant", "content": chosen}],
                                [{"role": "assistant", "content": rejected}], chat_template, tokens, where),
                   summary=summary)


def read_preferences(path: str | Path, **form: Any) -> list[PreferencePair]:
    """Every item of the file as a ``PreferencePair`` (``form``: ``to_pair``'s keyword options).

    A bad item is a ``DataError`` naming the file and item (``FILE:N``)."""
    from scratchlm.data.instruction import read_records

    items = read_records(path)
    if not items:
        raise DataError(f"{path} has no items", "pass a file with one preference pair per item")
    return [to_pair(item, where, **form) for item, where in items]


def drop_ties(pairs: Sequence[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """The pairs whose chosen and rejected differ, and how many did not (they carry no signal:
    the DPO gradient of a pair with identical completions is zero)."""
    kept = [p for p in pairs if p.chosen != p.rejected]
    return kept, len(pairs) - len(kept)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_pair(pair: PreferencePair, tokenizer: Tokenizer, max_length: int | None = None) -> EncodedPair:
    """Tokenize as TRL 1.16 does (module docstring); a row longer than ``max_length`` keeps its start."""
    eos = tokenizer.eos_id
    eos_text = tokenizer.eos_token

    def conversation(completion: str) -> list[int]:
        ids = tokenizer.encode(pair.prompt + completion, allowed_special="all")
        if pair.eos and eos is not None and not (eos_text and completion.endswith(eos_text)):
            ids.append(eos)
        return ids

    prompt = tokenizer.encode(pair.prompt, allowed_special="all")
    chosen, rejected = conversation(pair.chosen), conversation(pair.rejected)
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    out = EncodedPair(prompt[:n], chosen[n:], rejected[n:], source=pair)
    if max_length is not None:
        room = max(0, max_length - n)
        out.chosen, out.rejected = out.chosen[:room], out.rejected[:room]
    return out
