"""``lm.chat``: the prompt goes through the chat template and generation stops at the end of the turn.

The tiny model is built so that greedy decoding is known in advance: every layer's output
projections are zero, so the last hidden state is the (normalised) embedding of the current
token, and the LM head maps chosen embeddings to chosen next tokens.  After the generation
prompt it writes "H", "i", "!", then ``<|im_end|>``, then starts over -- so a reply that is exactly
"Hi!" proves that generation stopped at the end-of-turn token, which is not the tokenizer's eos.
"""

from __future__ import annotations

import pytest
import torch

import scratchlm
from scratchlm.api import LM
from scratchlm.errors import UserError
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer
from scratchlm.tokenizers.train_bpe import train_bpe

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "The quick brown fox jumps over the lazy dog. Hello there, how are you today? " * 8


def tiny_chat_lm(template: str | None = SMOLLM2) -> LM:
    """A Llama-shaped model whose greedy reply to any ChatML-ending prompt is "Hi!" + <|im_end|>."""
    tok = train_bpe(TEXT, 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = template
    config = ModelConfig(vocab_size=tok.vocab_size, context_length=128, n_layer=2, n_head=4,
                         n_kv_head_override=2, n_embd=32, intermediate_size_override=64, norm="rmsnorm",
                         norm_bias=False, mlp="swiglu", mlp_bias=False, positions="rope", qkv_bias=False,
                         o_bias=False, tie_embeddings=False)
    model = Transformer(config).eval()
    last = tok.encode("\n")[-1]  # every generation prompt here ends with "assistant\n"
    h, i, bang = (tok.encode(c)[0] for c in "Hi!")
    end = tok.special_tokens["<|im_end|>"]
    assert len({last, h, i, bang, end}) == 5
    chain = [(last, h), (h, i), (i, bang), (bang, end), (end, h)]  # current token -> next token
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (current, following) in enumerate(chain):
            model.embed_tokens.weight[current, k] = 1.0
            model.lm_head.weight[following, k] = 10.0
    return LM(model, tok, config)


@pytest.fixture(scope="module")
def lm() -> LM:
    return tiny_chat_lm()


def test_chat_stops_at_end_of_turn(lm):
    assert lm.tokenizer.eos_token == "<|endoftext|>"  # so stopping at <|im_end|> is chat's doing
    messages = [{"role": "user", "content": "Hello there"}]
    prompt = lm.chat_prompt(messages)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert lm.chat(messages, temperature=0, max_new_tokens=20) == "Hi!"
    # Without the chat's stop ids the same model runs on through the end-of-turn token.
    assert lm.generate(prompt, temperature=0, max_new_tokens=8) == "Hi!<|im_end|>Hi!<|im_end|>"

    stream = lm.chat_stream("Hello there", temperature=0, max_new_tokens=20)
    assert "".join(stream) == "Hi!"
    end = lm.tokenizer.special_tokens["<|im_end|>"]
    assert stream.completion.finish_reason == "stop" and stream.completion.token_ids[-1] == end
    assert stream.completion.completion_tokens == 4


def test_chat_stop_ids_and_strings(lm):
    specials = lm.tokenizer.special_tokens
    params = lm.chat_params(None, {"stop_token_ids": [7], "stop": ["zz"]})
    assert params.stop_token_ids == (7, specials["<|im_end|>"], specials["<|endoftext|>"])
    assert params.stop == ("zz",)  # <|im_end|> is a token here, not a string to look for
    assert lm.chat_params(None, {"ignore_eos": True}).stop_token_ids == ()

    plain = tiny_chat_lm(template=None)
    plain.tokenizer = train_bpe(TEXT, 280)  # no <|im_end|> token: ChatML's marker is plain text
    plain.chat_template = None
    params = plain.chat_params(None, {})
    assert params.stop == ("<|im_end|>",)
    assert params.stop_token_ids == (plain.tokenizer.special_tokens["<|endoftext|>"],)


def test_chatml_when_no_template():
    lm = tiny_chat_lm(template=None)
    assert lm.chat_template is None
    assert lm.chat_prompt("Hello there") == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert lm.chat("Hello there", temperature=0, max_new_tokens=20) == "Hi!"


def test_chat_errors(lm):
    with pytest.raises(UserError, match="did you mean 'user'"):
        lm.chat([{"role": "usr", "content": "hi"}])
    with pytest.raises(UserError, match="unknown sampling option 'temprature'"):
        lm.chat("hi", temprature=0)
    no_tokenizer = LM(lm.model, None, lm.config)
    with pytest.raises(UserError, match="no tokenizer"):
        no_tokenizer.chat("hi")


def test_run_dir_keeps_the_template_and_cli_chat(lm, tmp_path, run_cli):
    run = lm.save(tmp_path / "run")
    loaded = scratchlm.load(run, device="cpu")
    assert loaded.chat_template == SMOLLM2
    assert loaded.chat("Hello there", temperature=0, max_new_tokens=20) == "Hi!"

    code, out, err = run_cli("generate", "--model", run, "--chat", "Hello there", "--temperature", "0")
    assert (code, out, err) == (0, "Hi!\n", "")  # the output ends its last line
    code, out, _ = run_cli("generate", "--model", run, "--chat", "Hello there", "--system", "Be nice.",
                           "--temperature", "0", "--echo")
    assert code == 0
    assert out == ("<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
                   "<|im_start|>assistant\nHi!\n")
    code, _, err = run_cli("generate", "--model", run, "--chat", "a", "--prompt", "b")
    assert code == 2 and err.startswith("error: --prompt and --chat both given")
    code, _, err = run_cli("generate", "--model", run, "--prompt", "b", "--system", "s")
    assert code == 2 and err.startswith("error: --system needs --chat")


@pytest.mark.slow
def test_smollm2_gguf_answers_paris(smollm2_gguf):
    """The real model, through its own template from the GGUF metadata, greedy."""
    lm = scratchlm.load(smollm2_gguf, device="cpu")
    assert lm.chat_prompt("What is the capital of France?").startswith("<|im_start|>system\n")  # its default
    answer = lm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                     max_new_tokens=24)
    assert "Paris" in answer, answer


def test_chat_session_leaves_out_the_oldest_turns_once_the_context_is_full(lm):
    import io

    from scratchlm.cli.chat import ChatSession
    from scratchlm.generation import SamplingParams

    out = io.StringIO()
    session = ChatSession(lm, SamplingParams(temperature=0, max_new_tokens=8), system="Be brief.", out=out)
    question = "Hello there, how are you today? The quick brown fox jumps over the lazy dog."
    replies = [session.answer(f"{i}: {question}") for i in range(8)]
    assert replies == ["Hi!"] * 8  # 8 turns of about 40 tokens each, in a context of 128
    assert len(session.messages) == 1 + 2 * 8  # everything is kept (for /save) ...
    sent = session.sent_messages()  # ... but only the newest turns are sent, after the system message
    assert sent[0] == session.messages[0] and sent[1]["role"] == "user" and len(sent) < len(session.messages)
    prompt = lm.tokenizer.encode(lm.chat_prompt(sent), allowed_special="all")
    assert len(prompt) + 8 <= lm.config.context_length
    assert "the oldest" in out.getvalue() and "messages are no longer sent" in out.getvalue()
    # A message too long on its own: one error line, the conversation goes on without it.
    before = list(session.messages)
    assert session.answer(TEXT * 2) == ""
    assert out.getvalue().splitlines()[-1].startswith("error: a prompt of ")
    assert session.messages == before
    assert session.answer("And now?") == "Hi!"
