"""Multiple choice by log-likelihood: equal to lm-evaluation-harness's HF backend per choice, the
cached batched path equal to the definition, acc/acc_norm and their standard errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchlm.api import LM
from scratchlm.errors import ConfigError, DataError
from scratchlm.evaluation.mc import (
    Item,
    encode_item,
    evaluate_mc,
    read_items,
    score_reference,
    with_few_shot,
)
from scratchlm.evaluation.stats import mean_stderr
from scratchlm.models import from_preset
from scratchlm.tokenizers.train_bpe import train_bpe
from test_serving import wide_random_model

CORPUS = (Path(__file__).resolve().parent.parent / "src/scratchlm/evaluation/mc.py").read_text()
ITEMS = [
    Item("The cat sat on the", ["mat", "dog", "moon rises"], 0),
    Item("Question: what is two plus two?\nAnswer:", ["four", "five", "twenty-two", " 4"], 0),
    Item("A context ending in spaces   ", ["x", "yy"], 1),
    Item("Short", ["a long continuation with many tokens in it", "b"], 1),
    Item("", ["starts with nothing", "<|endoftext|> special first"], 0),
    Item("Unicode: naïve café —", ["ünïcödé", "ascii"], 1),
    Item("tokens merge across the boundary: ", ["boundary", "the"], 0),
]


def wide_random(config, std: float = 0.3) -> torch.nn.Module:
    return wide_random_model(config, std).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 320, special_tokens=("<|endoftext|>",))


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-lstm", "ngram-kn5"])
def lm(request, tokenizer) -> LM:
    """Every model family speaks the cache protocol (new_cache, select, return_hidden, lm_head)."""
    config = from_preset(request.param, vocab_size=320, context_length=128)
    if config.arch == "ngram":
        from scratchlm.models.ngram_module import NGramLM

        return LM(NGramLM.fit(config, tokenizer.encode(CORPUS)), tokenizer, config)
    return LM(wide_random(config), tokenizer, config)


def test_cached_batched_equals_definition(lm) -> None:
    """Shared context caches, left-padded batches and right-padded choices change nothing."""
    fast = evaluate_mc(lm.model, lm.tokenizer, ITEMS, batch_size=3)
    slow = evaluate_mc(lm.model, lm.tokenizer, ITEMS, reference=True)
    for a, b in zip(fast.items, slow.items, strict=True):
        assert [c.tokens for c in a.choices] == [c.tokens for c in b.choices]
        assert [c.greedy for c in a.choices] == [c.greedy for c in b.choices]
        for x, y in zip(a.choices, b.choices, strict=True):
            assert x.loglikelihood == pytest.approx(y.loglikelihood, abs=1e-4)
    assert fast.metrics() == slow.metrics()


def test_encoding_is_lm_evals(tokenizer) -> None:
    """Trailing context spaces move to the continuation; the continuation is the whole's tail."""
    e = encode_item(tokenizer, Item("Answer is   ", ["yes", "no"], 0), 0)
    assert e.context == tokenizer.encode("Answer is")
    assert e.continuations[0] == tokenizer.encode("Answer is    yes")[len(e.context):]
    empty = encode_item(tokenizer, Item("", ["a b", "c"], 0), 0)
    assert empty.context == [tokenizer.eos_id]  # no BOS: the EOS token conditions
    with pytest.raises(ConfigError, match="no BOS"):
        encode_item(tokenizer, Item("x", ["y", "z"], 0), 0, add_bos=True)


def test_metrics_and_stderr() -> None:
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)  # sd 0.5 (n - 1), over √4
    metrics = pytest.importorskip("lm_eval.api.metrics")
    values = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert mean_stderr(values) == pytest.approx(metrics.mean_stderr(values), abs=1e-12)


def test_acc_norm_divides_by_characters(lm) -> None:
    result = evaluate_mc(lm.model, lm.tokenizer, ITEMS[:2])
    for r in result.items:
        lls = [c.loglikelihood for c in r.choices]
        assert r.pred == max(range(len(lls)), key=lls.__getitem__)
        normed = [ll / len(ch) for ll, ch in zip(lls, ITEMS[r.index].choices, strict=True)]
        assert r.pred_norm == max(range(len(lls)), key=normed.__getitem__)


def test_too_long_item_is_skipped_and_counted(tokenizer) -> None:
    config = from_preset("tiny-llama", vocab_size=320, context_length=16)
    model = wide_random(config)
    items = [Item("short", ["a", "b"], 0), Item("word " * 40, ["a", "b"], 1)]
    result = evaluate_mc(model, tokenizer, items)
    assert result.metrics()["n"] == 1 and result.metrics()["skipped"] == 1
    assert "do not fit the model's context of 16" in result.items[1].skipped


def test_few_shot_prefix() -> None:
    shots = [Item("Q1", ["a", "b"], 1), Item("Q2", ["c", "d"], 0)]
    assert with_few_shot([Item("Q3", ["e", "f"], 0)], shots)[0].context == "Q1 b\n\nQ2 c\n\nQ3"


def test_read_formats() -> None:
    hellaswag = {"ctx": "A man", "endings": ["runs", "sits"], "label": "1"}
    arc = {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    piqa = {"goal": "Open a jar", "sol1": "twist", "sol2": "hit", "label": 0}
    items = read_items([hellaswag, arc, piqa], "f")
    assert items[0] == Item("A man", ["runs", "sits"], 1)
    assert items[1] == Item("Question: Why?\nAnswer:", ["x", "y"], 1)
    assert items[2] == Item("Question: Open a jar\nAnswer:", ["twist", "hit"], 0)
    mapped = read_items([{"q": "c", "opts": ["a", "b"], "gold": 1}], "f",
                        {"context": "q", "choices": "opts", "label": "gold"})
    assert mapped[0] == Item("c", ["a", "b"], 1)


@pytest.mark.parametrize("record, message", [
    ({"context": "c", "choices": ["a", "b"], "label": 2}, "label 2 is not a choice index"),
    ({"context": "c", "choices": ["a", "b"], "label": -1}, "label -1"),
    ({"context": "c", "choices": ["a", ""], "label": 0}, "choice 1 is empty"),
    ({"context": "c", "choices": ["a"], "label": 0}, "at least two"),
    ({"question": "q"}, "not a multiple-choice item"),
])
def test_bad_items(record, message) -> None:
    with pytest.raises(DataError, match=message):
        read_items([record], "f")


# ----- parity with lm-evaluation-harness ------------------------------------------------------

@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tokenizer):
    """A tiny random Llama saved by transformers, with our BPE as its tokenizer.json; and the same
    pair as lm-eval's HFLM sees it."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny-llama-mc")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=None, eos_token_id=319)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"),
                                                        eos_token="<|endoftext|>")
    return directory, model, hf_tokenizer


def test_per_choice_loglikelihoods_equal_lm_eval(hf_pair) -> None:
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from lm_eval.api.instance import Instance

    import scratchlm

    directory, hf_model, hf_tokenizer = hf_pair
    harness = huggingface.HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=4, device="cpu")
    requests = [Instance("loglikelihood", {}, (it.context, " " + choice), idx)
                for it in ITEMS for idx, choice in enumerate(it.choices)]
    expected = harness.loglikelihood(requests, disable_tqdm=True)
    lm = scratchlm.load(directory, device="cpu")
    ours = [c for r in evaluate_mc(lm.model, lm.tokenizer, ITEMS, batch_size=3).items for c in r.choices]
    assert len(ours) == len(expected)
    for c, (ll, greedy) in zip(ours, expected, strict=True):
        assert c.loglikelihood == pytest.approx(ll, abs=1e-4)
        assert c.greedy == greedy
    # and the reference path on its own
    e = encode_item(lm.tokenizer, ITEMS[1], 1)
    assert [c.loglikelihood for c in score_reference(lm.model, e)] == pytest.approx(
        [ll for ll, _ in expected[3:7]], abs=1e-4)


# ----- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer) -> Path:
    config = from_preset("tiny-llama", vocab_size=320, context_length=64)
    directory = tmp_path_factory.mktemp("mc-run")
    LM(wide_random(config), tokenizer, config).save(directory)
    return directory


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli(tmp_path, run_dir, run_cli) -> None:
    data = write_jsonl(tmp_path / "items.jsonl", [
        {"context": it.context, "choices": it.choices, "label": it.label} for it in ITEMS[:4]]
        + [{"context": "word " * 80, "choices": ["a", "b"], "label": 0}])
    shots = write_jsonl(tmp_path / "shots.jsonl", [{"context": "Q", "choices": ["a", "b"], "label": 0}])
    code, out, err = run_cli("eval", "mc", "--model", run_dir, "--data", data, "--out", tmp_path / "o.jsonl",
                             "--json", "--few-shot", "1", "--few-shot-file", shots)
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["n"] == 4 and metrics["skipped"] == 1
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and "skipped" in rows[4] and len(rows[0]["choices"]) == 3
    assert {"loglikelihood", "tokens", "greedy"} <= set(rows[0]["choices"][0])
    assert "skipped 1 item" in err
    code, out, _ = run_cli("eval", "mc", "--model", run_dir, "--data", data)
    assert code == 0 and "acc_norm" in out


@pytest.mark.parametrize("case", ["label", "empty_choice", "no_items", "few_shot_without_file", "fields"])
def test_cli_bad_inputs(tmp_path, run_dir, run_cli, case) -> None:
    records = {"label": [{"context": "c", "choices": ["a", "b"], "label": 5}],
               "empty_choice": [{"context": "c", "choices": ["a", ""], "label": 0}],
               "no_items": []}.get(case, [{"context": "c", "choices": ["a", "b"], "label": 0}])
    data = write_jsonl(tmp_path / "items.jsonl", records)
    extra = {"few_shot_without_file": ["--few-shot", "2"], "fields": ["--fields", "context"]}.get(case, [])
    code, out, err = run_cli("eval", "mc", "--model", run_dir, "--data", data, *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
