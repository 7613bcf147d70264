"""Instruction tuning (Raschka ch. 7, Burkov §5.3.3) over the one loop: the three data forms, the
templates and what they make targets, the loss against transformers', the command, its run dir
(chat, serve and peft read it) and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import scratchlm
from scratchlm.api import LM
from scratchlm.data.instruction import (
    book_split,
    encode_example,
    prompt_ids,
    read_examples,
)
from scratchlm.errors import ConfigError, DataError
from scratchlm.finetune.instruct import LengthGrouped, PadCollate, encode_rows, instruct_loss
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer
from scratchlm.prompts import (
    CHATML_TEMPLATE,
    PROMPT_STYLES,
    format_instruction,
    format_prompt,
    instruction_messages,
    render_chat,
    template_style,
)
from scratchlm.tokenizers.train_bpe import train_bpe
from scratchlm.training.logprobs import IGNORE_INDEX
from scratchlm.training.losses import next_token_loss

TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. ### Instruction: ### Input: ### Response: Name the capital of France. Paris. The quick "
        "brown fox jumps over the lazy dog. Hello there, how are you today? system user assistant ") * 6
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER = train_bpe(TEXT, 320, special_tokens=SPECIALS)
PLAIN_TOKENIZER = train_bpe(TEXT, 320, special_tokens=("<|endoftext|>",))  # no ChatML tokens
ENTRY = {"instruction": "Name the capital of France.", "input": "The quick brown fox.", "output": "Paris."}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "how are you today?"},
    {"role": "assistant", "content": "The fox is quick."},
]}


def tiny_config(vocab: int, context: int = 256) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, context_length=context, n_layer=2, n_head=4, n_kv_head_override=2,
                       n_embd=32, intermediate_size_override=64, norm="rmsnorm", norm_bias=False,
                       mlp="swiglu", mlp_bias=False, positions="rope", qkv_bias=False, o_bias=False,
                       tie_embeddings=False)


def tiny_hf_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=TOKENIZER.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))


def write_json(path: Path, rows: list, jsonl: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Name the capital of France {i}.", "input": "The quick fox." if i % 3 else "",
             "output": "Paris." if i % 2 else "Hello there."} for i in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-shaped run dir with a BPE tokenizer that has ChatML's tokens."""
    torch.manual_seed(0)
    config = tiny_config(TOKENIZER.vocab_size)
    path = tmp_path_factory.mktemp("base")
    LM(Transformer(config), TOKENIZER, config, CHATML_TEMPLATE).save(path)
    return path


# ----- data forms ---------------------------------------------------------------------------------


def test_the_three_forms_are_read_from_json_and_jsonl(tmp_path):
    alpaca = read_examples(write_json(tmp_path / "a.json", [ENTRY, {**ENTRY, "input": ""}]))
    assert [e.form for e in alpaca] == ["alpaca", "alpaca"] and alpaca[1].where.endswith("a.json:2")
    lines = read_examples(write_json(tmp_path / "a.jsonl", [ENTRY], jsonl=True))
    assert lines[0].record == ENTRY
    record = {"prompt": "Q: hi\nA:", "completion": " yo"}
    completion = read_examples(write_json(tmp_path / "c.jsonl", [record], jsonl=True))
    assert completion[0].form == "completion" and completion[0].reference() == " yo"
    chat = read_examples(write_json(tmp_path / "m.jsonl", [CHAT], jsonl=True))
    assert chat[0].form == "chat" and chat[0].reference() == "The fox is quick."
    assert chat[0].summary() == {"instruction": "how are you today?", "input": "",
                                 "reference": "The fox is quick."}


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "x"}], "'output' is missing"),
    ([{"instruction": "x", "output": "  "}], "the answer is empty"),
    ([{"instruction": "x", "output": 3}], "'output' is a int"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "last turn is the user's"),
    ([{"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     "did you mean 'user'"),
    ([{"messages": [{"role": "assistant", "content": "yo"}]}], "starts with the assistant's turn"),
    ([ENTRY, {"prompt": "a", "completion": "b"}], "the file's first is alpaca"),
    ([{"text": "hi"}], "keys text is not instruction data"),
    ([], "holds no records"),
])
def test_bad_records_are_one_line_errors_with_their_place(tmp_path, rows, message):
    with pytest.raises(DataError, match=message) as err:
        read_examples(write_json(tmp_path / "bad.json", rows))
    assert "\n" not in str(err.value)


def test_the_book_split_is_in_file_order():
    """Raschka ch. 7: the first 85 % train, the next 10 % test, the last 5 % validation."""
    examples = list(range(1100))
    train, val, test = book_split(examples)  # type: ignore[arg-type]
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[-1] == 934 and test == list(range(935, 1045)) and val == list(range(1045, 1100))
    with pytest.raises(DataError, match="add up to 1"):
        book_split(examples, (0.8, 0.1, 0.2))  # type: ignore[arg-type]


# ----- templates and targets ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROMPT_STYLES))
def test_each_style_template_renders_the_books_text(name):
    """The Jinja template of a style writes exactly format_instruction's text, then end-of-text
    (Alpaca, Phi-3) where Raschka's collate appends it; its generation prompt is format_prompt."""
    style = PROMPT_STYLES[name]
    for entry in (ENTRY, {**ENTRY, "input": ""}):
        prompt, response = format_instruction(entry, name)
        full = render_chat(instruction_messages(entry, style), style.template, add_generation_prompt=False,
                           eos_token="<|endoftext|>")
        assert full == prompt + response + ("" if name == "chatml" else "<|endoftext|>")
        assert format_prompt(entry, name) == prompt + style.response_prefix


def _targets_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, learn in zip(row.ids, row.target, strict=True) if learn])


def test_multi_turn_chat_learns_every_assistant_turn_and_its_end_only():
    """Token by token: the targets are the assistant turns' contents and their <|im_end|>\\n."""
    style = template_style("model", CHATML_TEMPLATE)
    example = read_examples_from(CHAT)
    row = encode_example(example, style, TOKENIZER)
    text = render_chat(CHAT["messages"], CHATML_TEMPLATE, add_generation_prompt=False)
    assert TOKENIZER.decode(row.ids) == text
    assert _targets_text(TOKENIZER, row) == "Hello.<|im_end|>\nThe fox is quick.<|im_end|>\n"
    end = TOKENIZER.special_tokens["<|im_end|>"]
    starts = [i for i, t in enumerate(row.ids) if t == TOKENIZER.special_tokens["<|im_start|>"]]
    # every <|im_end|> closing an assistant turn is a target; those closing system/user turns are not
    ends = [(i, row.target[i]) for i, t in enumerate(row.ids) if t == end]
    assert [learn for _, learn in ends] == [False, False, True, False, True]
    assert not any(row.target[i] for i in starts)


def read_examples_from(record: dict):
    from scratchlm.data.instruction import check_example, detect_form

    return check_example(record, detect_form(record, "x"), "x")


@pytest.mark.parametrize("name", ["alpaca", "phi3", "chatml", "model"])
def test_training_prompt_ids_are_the_ids_chat_feeds(name):
    """The tokens before each answer in training are the ids ``LM.chat`` builds for the same turns."""
    lm = LM(Transformer(tiny_config(TOKENIZER.vocab_size)), TOKENIZER, tiny_config(TOKENIZER.vocab_size),
            CHATML_TEMPLATE)
    style = template_style(name, lm.chat_template)
    lm.chat_template = style.template  # what the run dir saves and chat then uses
    for record in (CHAT, {"messages": instruction_messages(ENTRY, style)}):
        example = read_examples_from(record)
        row = encode_example(example, style, TOKENIZER)
        messages = record["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or (name != "model" and name != "chatml" and i > 2):
                continue
            fed = TOKENIZER.encode(lm.chat_prompt(messages[:i]), allowed_special="all")
            assert row.ids[:len(fed)] == fed and row.target[len(fed)] and not row.target[len(fed) - 1]
        assert prompt_ids(example, style, TOKENIZER) == TOKENIZER.encode(
            lm.chat_prompt(messages[:-1]), allowed_special="all")


def test_completion_form_is_used_as_written_with_end_of_text():
    example = read_examples_from({"prompt": "Hello there", "completion": " how are you"})
    row = encode_example(example, PROMPT_STYLES["alpaca"], TOKENIZER)
    assert row.ids == TOKENIZER.encode("Hello there") + TOKENIZER.encode(" how are you") + [TOKENIZER.eos_id]
    assert _targets_text(TOKENIZER, row) == " how are you<|endoftext|>"


def test_masking_truncation_and_padding():
    examples = [read_examples_from(r) for r in alpaca_rows(6)]
    style = PROMPT_STYLES["alpaca"]
    masked = encode_rows(examples, style, TOKENIZER, max_length=200)
    plain = encode_rows(examples, style, TOKENIZER, max_length=200, mask_prompt=False)
    for (ids, targets), (ids2, every) in zip(masked, plain, strict=True):
        assert ids == ids2 and every[:-1] == ids[1:]  # unmasked: every next token is a target
        assert all(t == IGNORE_INDEX for t in targets[:5]) and targets[-1] == TOKENIZER.eos_id
    shortest = min(map(len, masked.inputs))
    cut = encode_rows(examples, style, TOKENIZER, max_length=shortest - 2)
    assert cut.truncated + cut.dropped == len(examples) and cut.truncated >= 1
    assert max(map(len, cut.inputs)) == shortest - 2
    assert cut.targets[0][-1] != TOKENIZER.eos_id  # the end was cut off, the answer's start kept
    assert encode_rows(examples, style, TOKENIZER, max_length=5).dropped == len(examples)
    [batch] = PadCollate(pad=0, split=False)([masked[0], masked[1]])
    width = max(len(masked.inputs[0]), len(masked.inputs[1]))
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    short = min(0, 1, key=lambda r: len(masked.inputs[r]))  # one group keeps the items' order
    assert (batch["labels"][short, len(masked.inputs[short]):] == IGNORE_INDEX).all()
    assert (batch["input_ids"][short, len(masked.inputs[short]):] == 0).all()


def test_a_batch_cut_in_two_length_groups_gives_the_whole_batchs_loss_and_gradients():
    model = Transformer(tiny_config(TOKENIZER.vocab_size)).train()
    rows = [([5] * n, [IGNORE_INDEX] * (n - 3) + [7, 8, 9]) for n in (40, 38, 9, 8, 7, 41)]
    groups = PadCollate(pad=0)(rows)
    [whole] = PadCollate(pad=0, split=False)(rows)
    assert [g["input_ids"].shape for g in groups] == [(3, 41), (3, 9)]
    results = []
    for batch in (groups, [whole]):
        model.zero_grad()
        out = instruct_loss(model, batch)
        out.loss_sum.backward()
        grad = model.layers[0].mlp.up_proj.weight.grad.clone()
        results.append((out.loss_sum.detach(), int(out.count), grad))
    (a, n, ga), (b, m, gb) = results
    assert n == m == 18 and torch.allclose(a, b, rtol=1e-6) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-7)
    assert len(PadCollate(pad=0)(rows[2:5])) == 1  # similar lengths: no cut


def test_length_grouped_order_is_a_permutation_sorted_within_groups():
    rows = LengthGrouped([[1] * n for n in range(1, 1001)], [[0] * n for n in range(1, 1001)], [])
    order = rows.epoch_order(torch.Generator().manual_seed(0), 4).tolist()
    assert sorted(order) == list(range(1000))
    group = [len(rows.inputs[i]) for i in order[:200]]
    assert group == sorted(group, reverse=True)


# ----- the loss against transformers --------------------------------------------------------------


def test_masked_batch_loss_equals_transformers_labels_minus_100(tmp_path):
    """Our loss on a padded, prompt-masked batch (logits only at targets) equals transformers'
    ``labels=-100`` loss on the same batch, and so do the gradients."""
    hf = tiny_hf_llama().eval()
    hf.save_pretrained(tmp_path)
    ours = scratchlm.load(tmp_path, device="cpu").model.eval()
    examples = [read_examples_from(r) for r in alpaca_rows(3)]
    rows = encode_rows(examples, PROMPT_STYLES["alpaca"], TOKENIZER, max_length=200)
    [batch] = PadCollate(pad=0, split=False)([rows[i] for i in range(3)])
    out = next_token_loss(ours, batch)
    (out.loss_sum / out.count).backward()
    # transformers shifts labels itself: full sequences, -100 where not learned and on padding
    full = torch.cat([batch["input_ids"], torch.zeros(3, 1, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((3, 1), -100), batch["labels"]], dim=1)
    for r in range(3):
        width = int((batch["labels"][r] != IGNORE_INDEX).nonzero().max()) + 1  # the row's real length
        full[r, width] = batch["labels"][r, width - 1]
    expected = hf(full, labels=labels).loss
    expected.backward()
    assert abs(float((out.loss_sum / out.count).detach()) - float(expected.detach())) <= 1e-5
    hf_grad = hf.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(ours.layers[0].self_attn.q_proj.weight.grad, hf_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.lm_head.weight.grad, hf.lm_head.weight.grad, atol=1e-6, rtol=1e-4)


# ----- the command ----------------------------------------------------------------------------------


def test_instruct_command_writes_the_run_chat_and_serve_use(run_cli, model_dir, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_rows(40))
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("finetune", "instruct", "--model", str(model_dir), "--data", str(data),
                                   "--out", str(out), "--max-steps", "4", "--batch-size", "4",
                                   "--eval-every", "2", "--max-new-tokens", "6", "--group-by-length")
    assert code == 0, stderr
    assert "34 train / 2 validation / 4 test" in stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("val_loss" in r for r in evals)
    results = json.loads((out / "results.json").read_text())
    assert results["split_sizes"] == {"train": 34, "val": 2, "test": 4} and "test_loss" in results
    responses = [json.loads(line) for line in (out / "test_responses.jsonl").read_text().splitlines()]
    assert len(responses) == 4 and set(responses[0]) == {"instruction", "input", "reference", "response"}
    assert responses[0]["reference"] == alpaca_rows(40)[34]["output"]
    assert (out / "loss.png").stat().st_size > 0
    lm = scratchlm.load(out)
    assert lm.chat_template == PROMPT_STYLES["alpaca"].template
    assert lm.chat_prompt("Name it.") == format_prompt({"instruction": "Name it."})
    # the server formats a chat request with the run's template: the prompt the run was trained on
    import httpx

    from scratchlm.serving.openai_server import ServerConfig, ServerThread

    with ServerThread(lm, ServerConfig("sft", max_batch=2, max_queue=2, max_tokens_limit=8)) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
            "model": "sft", "messages": [{"role": "user", "content": "Name it."}], "max_tokens": 4,
            "temperature": 0}).json()
    fed = TOKENIZER.encode(format_prompt({"instruction": "Name it."}), allowed_special="all")
    assert reply["usage"]["prompt_tokens"] == len(fed)
    assert reply["choices"][0]["message"]["content"] == lm.chat("Name it.", temperature=0, max_new_tokens=4)


def test_lora_adapter_from_an_instruct_run_loads_in_peft(run_cli, tmp_path):
    import peft

    base = tmp_path / "hf"
    tiny_hf_llama().save_pretrained(base)
    TOKENIZER.save(base)
    data = write_json(tmp_path / "chat.jsonl", [CHAT] * 12, jsonl=True)
    out = tmp_path / "run"
    code, _, stderr = run_cli("finetune", "instruct", "--model", base, "--data", data, "--out", out,
                              "--train", "lora", "--lora-rank", "4", "--template", "chatml",
                              "--max-steps", "3", "--batch-size", "2", "--lr", "0.01",
                              "--max-new-tokens", "0")
    assert code == 0, stderr
    assert not (out / "test_responses.jsonl").exists()
    ours = scratchlm.load(out)
    plain_hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    hf = peft.PeftModel.from_pretrained(plain_hf, out / "adapter")
    ids = torch.tensor([TOKENIZER.encode("Hello there, how are you today?")])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), hf.eval()(ids).logits, atol=1e-5, rtol=1e-4)
        plain = transformers.AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert (ours.model(ids) - plain).abs().max() > 1e-4  # the adapter learned something


def test_last_blocks_trains_only_those_blocks(model_dir):
    from scratchlm.finetune.trainable import trainable_groups

    lm = scratchlm.load(model_dir)
    trainable_groups(lm.model, "last-blocks", 0.1, last_blocks=1)
    trained = {n.split(".")[0] + "." + n.split(".")[1] if n.startswith("layers") else n.split(".")[0]
               for n, p in lm.model.named_parameters() if p.requires_grad}
    assert trained == {"layers.1", "norm"}
    with pytest.raises(ConfigError, match="has 2 blocks"):
        trainable_groups(lm.model, "last-blocks", 0.1, last_blocks=3)


@pytest.mark.parametrize("make, args, message", [
    (lambda d: write_json(d / "x.json", [{"instruction": "x"}]), [], "'output' is missing"),
    (lambda d: write_json(d / "x.json", [{"instruction": "x", "output": ""}]), [], "the answer is empty"),
    (lambda d: write_json(d / "x.jsonl", [{"messages": [{"role": "user", "content": "x"}]}], jsonl=True), [],
     "last turn is the user's"),
    (lambda d: write_json(d / "x.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}], jsonl=True), [],
     "has role 'bot'"),
    (lambda d: write_json(d / "x.json", alpaca_rows(10)), ["--max-length", "4"], "every training example"),
    (lambda d: write_json(d / "x.json", alpaca_rows(10)), ["--train", "last-blocks"], "needs how many"),
    (lambda d: write_json(d / "x.json", alpaca_rows(10)), ["--split", "0.5,0.1"], "expected three fractions"),
    (lambda d: write_json(d / "x.json", alpaca_rows(10)), ["--split", "0.5,0.1,0.1"], "add up to 1"),
])
def test_bad_inputs_are_one_line_and_write_nothing(run_cli, model_dir, tmp_path, make, args, message):
    out = tmp_path / "run"
    code, _, stderr = run_cli("finetune", "instruct", "--model", model_dir, "--data", make(tmp_path),
                              "--out", out, *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) <= 2, stderr
    assert "Traceback" not in stderr and not out.exists()


def test_a_template_the_tokenizer_has_no_tokens_for(run_cli, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(PLAIN_TOKENIZER.vocab_size)
    base = tmp_path / "plain"
    LM(Transformer(config), PLAIN_TOKENIZER, config).save(base)
    data = write_json(tmp_path / "x.json", alpaca_rows(10))
    code, _, stderr = run_cli("finetune", "instruct", "--model", str(base), "--data", str(data),
                              "--out", str(tmp_path / "run"), "--template", "chatml")
    assert code == 2 and "<|im_start|>, <|im_end|>" in stderr and "--template model" in stderr
    code, _, stderr = run_cli("finetune", "instruct", "--model", str(base), "--data", str(data),
                              "--out", str(tmp_path / "run"), "--template", "model")
    assert code == 2 and "no chat template" in stderr


def test_an_interrupted_lora_run_resumes_exactly(run_cli, model_dir, tmp_path):
    """Ctrl-C after step 3 of 6, then --resume: the same losses and test responses as one straight run
    (length-grouped batches, LoRA, a masked prompt)."""
    from conftest import ctrl_c_at

    data = write_json(tmp_path / "data.json", alpaca_rows(40))
    args = ("--train", "lora", "--lora-rank", "4", "--max-steps", "6", "--batch-size", "4", "--lr", "0.01",
            "--eval-every", "3", "--max-new-tokens", "4", "--group-by-length")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    code, _, err = run_cli("finetune", "instruct", "--model", model_dir, "--data", data,
                           "--out", straight, *args)
    assert code == 0, err
    with ctrl_c_at(3):
        code, _, err = run_cli("finetune", "instruct", "--model", model_dir, "--data", data,
                               "--out", interrupted, *args)
    assert code == 130 and f"--resume {interrupted}" in err
    code, _, err = run_cli("finetune", "instruct", "--resume", interrupted)
    assert code == 0, err
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    assert (a["val_loss"], a["test_loss"]) == (b["val_loss"], b["test_loss"])
    responses = [(d / "test_responses.jsonl").read_text() for d in (straight, interrupted)]
    assert responses[0] == responses[1]
