"""`scratchlm generate` as a user meets it: the output ends with a newline, and a model that
generates nothing says so on stderr with what to try."""

from __future__ import annotations

import pytest
import torch

import scratchlm
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers.train_bpe import train_bpe

TEXT = "a tiny corpus for a tiny tokenizer, tiny and fine. " * 10


def save_lm(path, *, eos_first: bool, chat_template: str | None = None):
    """A tiny GPT-2 run dir.  With ``eos_first`` its every next token is the tokenizer's eos:
    the final LayerNorm's scale is 0, so its output is its shift whatever the input, and the
    untied head turns that shift into a logit only eos has."""
    tok = train_bpe(TEXT, 270, special_tokens=("<|endoftext|>",))
    tok.chat_template = chat_template
    config = from_preset("tiny-gpt2", vocab_size=tok.vocab_size, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(config).eval()
    if eos_first:
        with torch.no_grad():
            model.norm.weight.zero_()
            model.norm.bias.fill_(1.0)
            model.lm_head.weight.zero_()
            model.lm_head.weight[tok.eos_id] = 1.0
    return scratchlm.LM(model, tok, config).save(path)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize(("template", "hint"), [
    (None, "if it is a chat model, pass the message with --chat TEXT; to continue past the end of text, "
           "add --ignore-eos"),
    (CHATML, "it is a chat model: pass the message with --chat TEXT instead of --prompt"),
])
def test_nothing_generated_is_said_on_stderr_with_the_hint(tmp_path, run_cli, template, hint):
    run = save_lm(tmp_path / "run", eos_first=True, chat_template=template)
    assert scratchlm.load(run, device="cpu").generate("tiny", temperature=0) == ""

    code, out, err = run_cli("generate", "--model", run, "--prompt", "tiny", "--temperature", "0")
    assert (code, out) == (0, "")
    assert err == f"note: nothing generated: the model ended the text at once — {hint}\n"

    code, out, err = run_cli("generate", "--model", run, "--prompt", "tiny", "--echo")
    assert (code, out) == (0, "tiny\n")  # the echoed prompt still ends its line
    assert err.startswith("note: nothing generated")

    code, out, err = run_cli("generate", "--model", run, "--chat", "tiny", "--temperature", "0")
    assert (code, out) == (0, "")
    assert err == ("note: nothing generated: the model ended its turn at once — try another message, "
                   "a higher --temperature, or --ignore-eos\n")


def test_streamed_output_ends_with_one_newline(tmp_path, run_cli):
    run = save_lm(tmp_path / "run", eos_first=False)
    lm = scratchlm.load(run, device="cpu")
    expected = lm.generate("tiny", temperature=0, max_new_tokens=12, ignore_eos=True)
    assert expected and not expected.endswith("\n")
    code, out, err = run_cli("generate", "--model", run, "--prompt", "tiny", "--temperature", "0",
                             "--max-new-tokens", "12", "--ignore-eos")
    assert (code, out, err) == (0, expected + "\n", "")
