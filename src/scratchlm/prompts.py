"""Prompt formatting, in one place: chat templates for chat models, prompt styles for instruction data.

**Chat templates.**  A chat model ships a Jinja template (``tokenizer_config.json`` or the GGUF
``tokenizer.chat_template``) that turns a list of ``{"role", "content"}`` messages into the exact
text it was trained on.  ``render_chat`` renders it the way ``transformers``' ``apply_chat_template``
does, so a prompt built here is the prompt the model's authors intended:

* the environment is ``jinja2.sandbox.ImmutableSandboxedEnvironment`` -- a template from the hub is
  untrusted code, and the sandbox refuses attribute tricks and mutation of the data it is given;
* ``trim_blocks`` and ``lstrip_blocks`` are on and the ``loopcontrols`` extension is loaded
  (templates rely on both);
* the helpers templates call: ``raise_exception(msg)``, ``strftime_now(fmt)`` (Llama 3.1 dates),
  a ``tojson`` filter that does *not* HTML-escape (Jinja's own does) and accepts ``indent``,
  ``separators``, ``sort_keys`` and ``ensure_ascii``, a ``namespace`` that refuses underscore
  names, and a no-op ``{% generation %}`` block (transformers uses it to mark assistant tokens);
* the template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
  ``tools=None``, ``documents=None`` and any extra keyword (``date_string``, ``enable_thinking``).

Messages are checked before rendering (a list of mappings with a known ``role`` and a string
``content``), and every problem -- bad messages, a template that does not parse, a template that
calls ``raise_exception`` -- is a one-line ``UserError``.  Without a template, ChatML is used.

**Prompt styles.**  Instruction finetuning formats ``{"instruction", "input", "output"}`` entries
with a fixed text template.  Each style (``PROMPT_STYLES``) is a Jinja chat template, so the same
definition renders training text, inference prompts and a finetuned run's chat: Raschka's Alpaca
(ch. 7), Raschka's Phi-3 variant (exercise 7.1) and Burkov's ChatML ``build_prompt`` (B §5.3.3).
``format_instruction(entry, style)`` returns ``(prompt, response)``, split where the books start
the loss mask; ``format_prompt`` is what a model continues to answer an entry.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scratchlm.errors import DataError, UserError

__all__ = [
    "CHATML_TEMPLATE", "ROLES", "END_OF_TURN_TOKENS", "render_chat", "check_messages",
    "PromptStyle", "PROMPT_STYLES", "get_style", "format_instruction", "format_prompt",
    "instruction_messages",
    "TEMPLATE_CHOICES", "template_style",
    "ALPACA_TEMPLATE", "PHI3_TEMPLATE", "BURKOV_CHATML_TEMPLATE",
]

# ----------------------------------------------------------------------------------------------
# Chat templates
# ----------------------------------------------------------------------------------------------

# The ChatML template transformers used as its default: each message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens the assistant's turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Roles that chat templates know.  "ipython" is Llama 3.1's tool-output role, "developer" OpenAI's
# newer name for system; a role outside this set is almost always a typo ("usr", "bot").
ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")

# Tokens that end a turn in the common chat formats: ChatML (Qwen, SmolLM2), Llama 3 (<|eot_id|>,
# and <|eom_id|> after a tool call), Phi-3 (<|end|>), Gemma (<end_of_turn>).  Generation for chat
# stops on whichever of these the tokenizer has, besides its end-of-sequence token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


class _TemplateRaised(Exception):
    """What ``raise_exception`` throws: the template's own message, kept apart from jinja's errors."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without HTML escaping (Jinja's built-in ``tojson`` turns ``<`` into ``\\u003c``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    """The compiled template, cached: a chat session renders the same template every turn."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's ``namespace`` minus underscore attributes, the way into CPython internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- jinja's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"namespace attribute {name!r} starts with an underscore")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        what = _one_line(str(err.message))
        raise UserError(f"the chat template does not parse: {what} (line {err.lineno})",
                        "fix the template, or pass template=None for ChatML") from None


def _one_line(text: str) -> str:
    """Error text from a template on one line, as the CLI prints errors."""
    return " ".join(text.split())


def _plain(value: Any, where: str) -> Any:
    """A fresh copy made of JSON types only: the template never sees the caller's own objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (str enums, ...) back to the base type, without calling their own methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise UserError(f"{where} is a {type(value).__name__}, which a chat template cannot take",
                    "use strings, numbers, lists and dicts in messages")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages and return a plain copy of them.

    Each message is a mapping with a ``role`` from ``ROLES`` and a string ``content`` (an
    assistant message that only makes tool calls may have ``content`` None).  Other keys
    (``tool_calls``, ``name``) pass through to the template.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UserError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                        f"not {type(messages).__name__}",
                        "wrap the text as [{'role': 'user', 'content': text}]")
    if not messages:
        raise UserError("the chat has no messages", "pass at least one {'role': 'user', 'content': ...}")
    out = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise UserError(f"{where} is a {type(message).__name__}, not a dict",
                            "give each message as {'role': ..., 'content': ...}")
        role = message.get("role")
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(ROLES)}"
            raise UserError(f"{where} has role {role!r}" if "role" in message else f"{where} has no 'role'",
                            hint)
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and role == "assistant"
                                                 and message.get("tool_calls")):
            got = "no 'content'" if "content" not in message else f"content of type {type(content).__name__}"
            raise UserError(f"{where} ({role}) has {got}", "give each message its text as a string 'content'")
        out.append(_plain(message, where))
    return out


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None = None, *,
                add_generation_prompt: bool = True, bos_token: str | None = None,
                eos_token: str | None = None, **extra: Any) -> str:
    """Render ``messages`` with a Jinja chat template (ChatML when ``template`` is None).

    ``add_generation_prompt`` appends the opening of the assistant's turn (what the model then
    continues); leave it off to render a finished conversation for training.  ``bos_token`` /
    ``eos_token`` are the token *strings* templates splice in; ``extra`` reaches the template as
    further variables.  The result equals ``transformers``' ``apply_chat_template(...,
    tokenize=False)`` for the same template and tokens.
    """
    import jinja2

    compiled = _compile(template if template is not None else CHATML_TEMPLATE)
    variables = {"tools": None, "documents": None, **_plain(extra, "a template variable")}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return compiled.render(messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
                               **variables)
    except _TemplateRaised as err:
        raise UserError(f"the chat template refused these messages: {_one_line(str(err))}",
                        "change the messages to the form this model's template accepts") from None
    except jinja2.TemplateError as err:
        raise UserError(f"the chat template failed: {_one_line(str(err.message))}",
                        "fix the template, or pass template=None for ChatML") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
        raise UserError(f"the chat template failed: {type(err).__name__}: {_one_line(str(err))}",
                        "fix the template, or pass template=None for ChatML") from None


# ----------------------------------------------------------------------------------------------
# Prompt styles for instruction data
# ----------------------------------------------------------------------------------------------


# Each style is a Jinja chat template over messages, so one definition serves training (render the
# whole conversation), inference (render up to the assistant's turn with the generation prompt) and
# chat/serve on a finetuned run (the template is saved with it).  The user's turn of an instruction
# entry is its instruction followed by the style's input block (``instruction_messages``).  Alpaca
# and Phi-3 end each answer with the end-of-text token, which Raschka appends as the first
# padding token that stays a target; ChatML ends it with <|im_end|>.

ALPACA_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}{%- set turns = messages[1:] -%}"
    "{%- else -%}{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' }}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\n### Instruction:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '\\n\\n### Response:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('the alpaca template has no ' + message['role'] + ' turns') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n\\n### Response:\\n' }}{%- endif -%}"
)

PHI3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ ('' if loop.first else '\\n') + '<|user|>\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\n<|assistant|>:\\n' + message['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('the phi3 template has no ' + message['role'] + ' turns') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|assistant|>:\\n' }}{%- endif -%}"
)

BURKOV_CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.\\n<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ ('' if loop.first else '\\n') + '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '\\n<|im_end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PromptStyle:
    """A prompt style: a chat ``template`` (Jinja, as ``render_chat`` takes), and how an instruction
    entry becomes a user turn (``input_block``, holding ``{input}``, follows the instruction when
    the entry has a non-empty input).

    ``response_prefix`` is the end of the generation prompt that belongs to the response when the
    books split the text for loss masking (Raschka's ``instruction_length`` counts the prompt
    without the response header): ``format_instruction`` splits there.  ``tokens`` are the
    special tokens the template writes, which a tokenizer must have for the style to make sense.
    """

    name: str
    template: str
    input_block: str
    response_prefix: str
    description: str = ""
    tokens: tuple[str, ...] = ()


PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style for style in (
        PromptStyle(
            name="alpaca", template=ALPACA_TEMPLATE, input_block="\n\n### Input:\n{input}",
            response_prefix="\n\n### Response:\n",
            description="Raschka ch. 7 (format_input): Alpaca with its preamble, end-of-text after the "
                        "answer",
        ),
        PromptStyle(
            name="phi3", template=PHI3_TEMPLATE, input_block="\n{input}",
            response_prefix="\n<|assistant|>:\n",
            description="Raschka exercise 7.1 (format_input_phi): Phi-3's role tags, as the book writes them",
        ),
        PromptStyle(
            name="chatml", template=BURKOV_CHATML_TEMPLATE, input_block="\n\n{input}", response_prefix="\n",
            description="Burkov B §5.3.3 (build_prompt): ChatML with a system turn and a newline before "
                        "each <|im_end|>",
            tokens=("<|im_start|>", "<|im_end|>"),
        ),
    )
}


def get_style(style: str | PromptStyle) -> PromptStyle:
    """A style by name (``alpaca``, ``phi3``, ``chatml``), or the ``PromptStyle`` given."""
    if isinstance(style, PromptStyle):
        return style
    if style not in PROMPT_STYLES:
        close = difflib.get_close_matches(str(style), PROMPT_STYLES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(PROMPT_STYLES)}"
        raise UserError(f"unknown prompt style {style!r}", hint)
    return PROMPT_STYLES[style]


TEMPLATE_CHOICES = (*PROMPT_STYLES, "model")


def template_style(name: str, model_template: str | None) -> PromptStyle:
    """The style ``--template NAME`` names: one of ``PROMPT_STYLES``, or ``model``: the model's own
    chat template (``model_template``), whose user turn of an instruction entry is the instruction,
    a blank line and the input."""
    if name != "model":
        return get_style(name)
    if model_template is None:
        raise UserError("this model has no chat template of its own",
                        f"pick one with --template {'|'.join(PROMPT_STYLES)}")
    return PromptStyle("model", model_template, input_block="\n\n{input}", response_prefix="",
                       description="the model's own chat template")


def _field(entry: Mapping[str, Any], key: str, required: bool) -> str:
    value = entry.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "is missing" if key not in entry else f"is a {type(value).__name__}"
        raise DataError(f"the instruction entry's {key!r} {got}, not a string",
                        "each entry needs 'instruction' and 'output' strings (and an optional 'input')")
    return value


def instruction_messages(entry: Mapping[str, Any], style: str | PromptStyle = "alpaca", *,
                         with_output: bool = True) -> list[dict[str, str]]:
    """An ``{"instruction", "input", "output"}`` entry as chat messages: the user's turn is the
    instruction and the style's input block, the assistant's the output (left out when
    ``with_output`` is false: the prompt of an entry to answer)."""
    style = get_style(style)
    if not isinstance(entry, Mapping):
        raise DataError(f"an instruction entry must be a dict, not {type(entry).__name__}",
                        "give entries as {'instruction': ..., 'input': ..., 'output': ...}")
    instruction = _field(entry, "instruction", required=True)
    given = _field(entry, "input", required=False)
    user = instruction + (style.input_block.replace("{input}", given) if given else "")
    messages = [{"role": "user", "content": user}]
    if with_output:
        messages.append({"role": "assistant", "content": _field(entry, "output", required=True)})
    return messages


def format_prompt(entry: Mapping[str, Any], style: str | PromptStyle = "alpaca") -> str:
    """The text a model continues to answer ``entry`` (its ``output`` is not needed)."""
    style = get_style(style)
    return render_chat(instruction_messages(entry, style, with_output=False), style.template)


def format_instruction(entry: Mapping[str, Any], style: str | PromptStyle = "alpaca") -> tuple[str, str]:
    """``(prompt, response)`` of an ``{"instruction", "input", "output"}`` entry.

    ``prompt + response`` is the training text; the response starts at the style's
    ``response_prefix`` (where the books start the loss mask).  The end-of-text token is not
    included: the collate step appends it.
    """
    style = get_style(style)
    messages = instruction_messages(entry, style)
    prompt = format_prompt(entry, style)[:-len(style.response_prefix) or None]
    text = render_chat(messages, style.template, add_generation_prompt=False, eos_token="")
    return prompt, text[len(prompt):]
