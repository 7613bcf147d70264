"""Chat templates rendered as transformers' ``apply_chat_template`` does; the prompt styles' exact text."""

from __future__ import annotations

import pytest

from scratchlm.errors import DataError, UserError
from scratchlm.prompts import (
    CHATML_TEMPLATE,
    PROMPT_STYLES,
    PromptStyle,
    format_instruction,
    format_prompt,
    render_chat,
)

# ----- templates in the style of real models' ---------------------------------------------------

# SmolLM2-Instruct's template: ChatML with a default system prompt when the chat has none.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.1's shape: bos_token, whitespace control with "-", a date from strftime_now unless
# date_string is given, the system message split off with a slice, |trim, and tools as tojson.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You may call these functions:\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral's: roles must alternate, checked with raise_exception; bos/eos tokens spliced in.
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# No "-" whitespace control at all: the output depends on trim_blocks and lstrip_blocks.  Also
# namespace(), loop controls, a {% generation %} block and tojson of text with HTML characters.
BLOCKS = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message.role == 'assistant' %}
{% generation %}[ASSISTANT] {{ message.content }}{% endgeneration %}
    {% else %}
[{{ message.role | upper }} {{ ns.turns }}] {{ message.content | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"""

TEMPLATES = {"chatml": CHATML_TEMPLATE, "smollm2": SMOLLM2, "llama3": LLAMA3, "alternating": ALTERNATING,
             "blocks": BLOCKS}

CHATS = {
    "one question": [{"role": "user", "content": "What is the capital of France?"}],
    "with system": [
        {"role": "system", "content": "  Answer briefly.  "},
        {"role": "user", "content": "Hi <b>there</b> & \"bye\" — ça va?"},
        {"role": "assistant", "content": "Hello!\n"},
        {"role": "user", "content": "Name a colour."},
    ],
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A transformers tokenizer with bos/eos set, so apply_chat_template passes both to templates."""
    import transformers

    from scratchlm.tokenizers.train_bpe import train_bpe

    tok = train_bpe("the cat sat on the mat. " * 20, 270, special_tokens=("<s>", "</s>"))
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                                bos_token="<s>", eos_token="</s>")


def theirs(hf_tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)


def ours(template: str, messages: list[dict], add_generation_prompt: bool, **kwargs) -> str:
    return render_chat(messages, template, add_generation_prompt=add_generation_prompt,
                       bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_render_equals_transformers(hf_tokenizer, name, chat, add_generation_prompt):
    template, messages = TEMPLATES[name], CHATS[chat]
    if name == "alternating" and messages[0]["role"] == "system":
        pytest.skip("this template refuses a system message (tested below)")
    expected = theirs(hf_tokenizer, template, messages, add_generation_prompt)
    assert ours(template, messages, add_generation_prompt) == expected


def test_template_variables_and_tools_equal_transformers(hf_tokenizer):
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather <now> in «city»",
                                                "parameters": {"city": {"type": "string"}}}}]
    messages = CHATS["with system"]
    expected = theirs(hf_tokenizer, LLAMA3, messages, True, tools=tools, date_string="26 Jul 2024")
    assert ours(LLAMA3, messages, True, tools=tools, date_string="26 Jul 2024") == expected
    assert '"description": "Weather <now> in «city»"' in expected  # not HTML-escaped, not ASCII-escaped


def test_default_is_chatml():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(messages, add_generation_prompt=False).endswith("Hi<|im_end|>\n")


def test_raise_exception_becomes_user_error(hf_tokenizer):
    messages = CHATS["with system"]
    with pytest.raises(Exception, match="must alternate"):  # jinja2.TemplateError in transformers
        theirs(hf_tokenizer, ALTERNATING, messages, True)
    with pytest.raises(UserError, match="refused these messages: Conversation roles must alternate") as err:
        ours(ALTERNATING, messages, True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("messages, message", [
    ("hello", "must be a list"),
    ([], "no messages"),
    (["hello"], "message 0 is a str"),
    ([{"content": "hi"}], "message 0 has no 'role'"),
    ([{"role": "usr", "content": "hi"}], "did you mean 'user'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}],
     "message 1 \\(assistant\\) has no 'content'"),
    ([{"role": "user", "content": 42}], "content of type int"),
    ([{"role": "user", "content": "hi", "extra": object()}], "message 0.extra is a object"),
])
def test_bad_messages(messages, message):
    with pytest.raises(UserError, match=message):
        render_chat(messages)


def test_bad_templates_and_the_sandbox():
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=r"does not parse: .*\(line 1\)"):
        render_chat(hi, "{% for message in messages %}")
    for attack in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}",
                   "{% set ns = namespace(_x=1) %}"):
        with pytest.raises(UserError, match="the chat template failed"):
            render_chat(hi, attack)
    with pytest.raises(UserError, match="the chat template failed: TypeError"):
        render_chat(hi, "{{ 'a' + 1 }}")


def test_tool_call_message_without_content():
    call = {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    template = "{% for m in messages %}{{ m.tool_calls|tojson if m.tool_calls else m.content }}|{% endfor %}"
    text = render_chat([{"role": "user", "content": "hi"}, call], template)
    assert text == 'hi|[{"name": "f", "arguments": {"x": 1}}]|'


# ----- prompt styles ------------------------------------------------------------------------------

ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
         "output": "The car is as fast as lightning."}
NO_INPUT = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}


def test_alpaca_is_raschkas_full_template():
    """book-oracles §3.3: the preamble, the optional ### Input: block, "\\n\\n### Response:\\n{output}"."""
    prompt, response = format_instruction(ENTRY, "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast."
    )
    assert response == "\n\n### Response:\nThe car is as fast as lightning."
    prompt, response = format_instruction(NO_INPUT, "alpaca")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nName the capital of France.")
    assert response == "\n\n### Response:\nParis."
    assert format_instruction({k: v for k, v in NO_INPUT.items() if k != "input"}) == (prompt, response)
    assert format_prompt(NO_INPUT) == prompt + "\n\n### Response:\n"


def test_phi3_is_raschkas_exercise_variant():
    assert format_instruction(ENTRY, "phi3") == (
        "<|user|>\nRewrite the sentence using a simile.\nThe car is very fast.",
        "\n<|assistant|>:\nThe car is as fast as lightning.",
    )
    assert format_instruction(NO_INPUT, "phi3") == ("<|user|>\nName the capital of France.",
                                                    "\n<|assistant|>:\nParis.")


def test_chatml_is_burkovs_build_prompt():
    """book-oracles §3.3: a newline before each <|im_end|>; the prompt ends right after 'assistant'."""
    prompt, response = format_instruction(NO_INPUT, "chatml")
    assert prompt + response == (
        "<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n"
        "<|im_start|>user\nName the capital of France.\n<|im_end|>\n"
        "<|im_start|>assistant\nParis.\n<|im_end|>"
    )
    assert prompt.endswith("<|im_start|>assistant")
    assert format_instruction(ENTRY, "chatml")[0].endswith(
        "user\nRewrite the sentence using a simile.\n\nThe car is very fast.\n<|im_end|>\n"
        "<|im_start|>assistant")


def test_styles_are_data():
    assert set(PROMPT_STYLES) == {"alpaca", "phi3", "chatml"}
    custom = PromptStyle("vicuna", "{% for m in messages %}{{ ('USER: ' if m.role == 'user' else "
                         "'\\nASSISTANT: ') + m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '\\nASSISTANT: ' }}{% endif %}",
                         " {input}", "\nASSISTANT: ")
    assert format_instruction(NO_INPUT, custom) == ("USER: Name the capital of France.",
                                                    "\nASSISTANT: Paris.")
    braces = {"instruction": "Fill {input} and {0}", "output": "{x}"}
    assert format_instruction(braces, "phi3") == ("<|user|>\nFill {input} and {0}", "\n<|assistant|>:\n{x}")


def test_bad_entries_and_styles():
    with pytest.raises(UserError, match="did you mean 'alpaca'"):
        format_instruction(ENTRY, "alpacca")
    with pytest.raises(DataError, match="'instruction' is missing"):
        format_instruction({"output": "x"})
    with pytest.raises(DataError, match="'output' is a int"):
        format_instruction({"instruction": "x", "output": 3})
    with pytest.raises(DataError, match="must be a dict"):
        format_prompt(["x"])
