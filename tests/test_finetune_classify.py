"""Classification finetuning (Raschka ch. 6) over the one loop: the head, the cached frozen prefix, the
command, the run dir it leaves, and its one-line errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import ctrl_c_at
from scratchlm.finetune.classify import Collate, cache_prefix, encode, trainable_set
from scratchlm.finetune.data import LabelledText, balance, label_set, read_labelled, split
from scratchlm.finetune.heads import LabelText, SequenceClassifier, last_positions
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers import CharTokenizer
from scratchlm.training.losses import GroupedLoss, classification_loss

HAM = ["see you at lunch", "ok i will call you later", "are we meeting today", "thanks for dinner",
       "running late sorry", "happy birthday to you"]
SPAM = ["WIN a FREE prize now", "claim your cash reward", "URGENT call to win", "free entry to win cash",
        "you have WON a prize", "text WIN to claim"]


def examples(n: int = 60, seed: int = 0) -> list[LabelledText]:
    rng = random.Random(seed)
    return [LabelledText(rng.choice(SPAM if i % 2 else HAM) + " " + rng.choice(["x", "now", "!", "pls"]),
                         "spam" if i % 2 else "ham") for i in range(n)]


@pytest.fixture
def tokenizer():
    return CharTokenizer.from_text("".join(x.text for x in examples()) + "?")


def classifier(tokenizer, preset="tiny-llama", seed=0) -> SequenceClassifier:
    torch.manual_seed(seed)
    base = build_model(from_preset(preset, vocab_size=tokenizer.vocab_size, context_length=32))
    model = SequenceClassifier(base, ["ham", "spam"])
    torch.nn.init.normal_(model.score.weight, std=0.5)
    return model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_left_and_right_padding_give_the_same_logits(tokenizer, preset):
    model = classifier(tokenizer, preset).eval()
    texts = ["see you at lunch", "URGENT call to win now please", "ok"]
    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids))
    right = torch.zeros(3, width, dtype=torch.long)
    left = torch.zeros(3, width, dtype=torch.long)
    right_mask, left_mask = torch.zeros_like(right), torch.zeros_like(left)
    for row, seq in enumerate(ids):
        right[row, :len(seq)], right_mask[row, :len(seq)] = torch.tensor(seq), 1
        left[row, width - len(seq):], left_mask[row, width - len(seq):] = torch.tensor(seq), 1
    alone = torch.cat([model(torch.tensor([seq])) for seq in ids])
    torch.testing.assert_close(model(right, right_mask), alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(left, left_mask), alone, rtol=1e-5, atol=1e-6)
    assert last_positions(left_mask).tolist() == [width - 1] * 3


def test_the_cached_frozen_prefix_gives_the_plain_loss_and_gradients(tokenizer):
    """--train last-block: the frozen blocks' output, computed once, gives what running them does."""
    data = encode(examples(12), tokenizer, ["ham", "spam"], 32)
    plain, cached = classifier(tokenizer), classifier(tokenizer)
    results = []
    for model, frozen in ((plain, False), (cached, True)):
        chosen = trainable_set(model, "last-block", 0.1)
        assert chosen.frozen_blocks == len(model.base.layers) - 1
        items = data
        if frozen:
            items = encode(examples(12), tokenizer, ["ham", "spam"], 32)
            cache_prefix(model.base, items, chosen.frozen_blocks, pad=0, batch_size=5)
        collate = Collate(0, chosen.frozen_blocks if frozen else 0)
        out = GroupedLoss(classification_loss)(model, collate([items[i] for i in range(len(items))]))
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss_sum.detach(), out.metrics["accuracy"], grads))
    (loss_a, acc_a, grads_a), (loss_b, acc_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert acc_a == acc_b and grads_a.keys() == grads_b.keys() and "score.weight" in grads_a
    assert any(n.startswith("base.layers.1.") for n in grads_a)
    assert not any(n.startswith("base.layers.0.") or "embed" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_trainable_sets():
    tok = CharTokenizer.from_text("abc")
    model = classifier(tok)
    assert trainable_set(model, "head", 0.1).frozen_blocks == len(model.base.layers)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"score.weight"}
    assert trainable_set(model, "all", 0.1).frozen_blocks == 0
    assert all(p.requires_grad for p in model.parameters())


def test_reading_balancing_and_splitting(tmp_path):
    tsv = tmp_path / "data.tsv"
    tsv.write_text("label\ttext\nham\thello there\nspam\tWIN now\tor never\nham\tbye\n\n")
    assert read_labelled(tsv) == [LabelledText("hello there", "ham"),
                                  LabelledText("WIN now\tor never", "spam"), LabelledText("bye", "ham")]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n')
    assert [x.label for x in read_labelled(jsonl)] == ["1", "x"]
    data = [LabelledText(str(i), "a" if i < 80 else "b") for i in range(100)]
    balanced = balance(data, seed=123)
    assert sorted(x.label for x in balanced) == ["a"] * 20 + ["b"] * 20
    train, val, test = split(balanced, [0.7, 0.1, 0.2], seed=123)
    assert (len(train), len(val), len(test)) == (28, 4, 8)
    assert split(balanced, [0.7, 0.1, 0.2], seed=123) == (train, val, test)
    assert sorted(map(str, train + val + test)) == sorted(map(str, balanced))
    assert label_set(train, val, test) == ["a", "b"]


def write_data(path, n=60):
    path.write_text("".join(f"{x.label}\t{x.text}\n" for x in examples(n)))
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny character-level Llama pretrained for a few steps on the texts."""
    from scratchlm.cli import main

    root = tmp_path_factory.mktemp("classify")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(x.text for x in examples(400)) + "\n?Predict label: Label:")
    assert main(["pretrain", "--preset", "tiny-llama", "--data", str(corpus), "--context-length", "32",
                 "--batch-size", "8", "--max-steps", "4", "--eval-every", "0", "--eval-batches", "1",
                 "--sample-tokens", "0", "--out", str(root / "base")]) == 0
    return root / "base"


TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "3e-3", "--threads", "1"]


def test_finetune_classify_writes_a_run_that_classifies(run_cli, tmp_path, base_run):
    data = write_data(tmp_path / "sms.tsv")
    run = tmp_path / "cls"
    code, out, err = run_cli("finetune", "classify", "--model", base_run, "--data", data, "--out", run,
                             *TRAIN)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert results["split_sizes"] == {"train": 42, "val": 6, "test": 12}  # 0.7 / 0.1 / 0.2 of 60
    assert {"train_accuracy", "val_accuracy", "test_accuracy", "test_loss", "wall_time_s"} <= set(results)
    assert results["labels"] == ["ham", "spam"] and 0 <= results["test_accuracy"] <= 1
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [round(r["epochs"]) for r in evals] == [1, 2] and all("val_accuracy" in r for r in evals)
    payload = json.loads((run / "config.json").read_text())
    assert payload["head"]["labels"] == ["ham", "spam"] and payload["base_model"] == str(base_run.resolve())
    assert (run / "loss.png").exists()

    import scratchlm

    lm = scratchlm.load(run)
    assert lm.labels == ["ham", "spam"]
    predictions = lm.classify(["WIN a FREE prize now", "see you at lunch"])
    assert [label for label, _ in predictions] and all(0.5 <= p <= 1 for _, p in predictions)
    code, out, err = run_cli("classify", "--model", run, "--text", "WIN a FREE prize now", "--json")
    assert code == 0, err
    assert json.loads(out)["label"] == predictions[0][0]
    code, _, err = run_cli("generate", "--model", run, "--prompt", "hi")
    assert code == 2 and "is a classifier" in err


def one_line(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_bad_inputs_are_one_line_errors_and_write_nothing(run_cli, tmp_path, base_run):
    good = write_data(tmp_path / "good.tsv")
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    one_class = tmp_path / "one.tsv"
    one_class.write_text("ham\thello\nham\tbye\n" * 10)
    no_text = tmp_path / "no_text.tsv"
    no_text.write_text("ham\thello\nspam\n")
    test_only = tmp_path / "test_only.tsv"
    test_only.write_text("odd\tunique label\n")
    out = tmp_path / "run"
    cases = [
        (["--data", tmp_path / "missing.tsv"], "not found"),
        (["--data", empty], "has no rows"),
        (["--data", one_class, "--no-balance"], "one class only"),
        (["--data", no_text], ":2: no tab"),
        (["--data", good, "--test-data", test_only], "'odd'"),
        (["--data", good, "--split", "0.5,0.1"], "three fractions"),
        (["--data", good, "--train", "lora", "--lora-rank", "0"], "--lora-rank"),
        (["--data", good, "--batch-size", "0"], "batch_size"),
    ]
    for args, fragment in cases:
        code, _, err = run_cli("finetune", "classify", "--model", base_run, *TRAIN, *args, "--out", out)
        one_line(code, err, fragment)
        assert not out.exists(), args
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", good, "--out", out, *TRAIN)
    one_line(code, err, "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_finetuning_resumes_exactly(run_cli, tmp_path, base_run):
    data = write_data(tmp_path / "sms.tsv")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli("finetune", "classify", "--model", base_run, "--data", data, "--out", straight,
                   *TRAIN)[0] == 0
    with ctrl_c_at(3):
        code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", data,
                               "--out", interrupted, *TRAIN)
    assert code == 130 and f"--resume {interrupted}" in err
    code, _, err = run_cli("finetune", "classify", "--resume", interrupted)
    assert code == 0, err
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    for key in ("train_loss", "val_loss", "test_loss", "test_accuracy"):
        assert a[key] == b[key], key


def test_lora_classifier_saves_a_peft_adapter_and_loads_back(run_cli, tmp_path, base_run):
    data = write_data(tmp_path / "sms.tsv")
    run = tmp_path / "lora"
    code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", data, "--out", run, *TRAIN,
                           "--train", "lora", "--lora-rank", "4", "--lora-alpha", "8")
    assert code == 0, err
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    assert "score.weight" in names and all("lora_" in n or n == "score.weight" for n in names)
    import scratchlm

    texts = ["WIN a FREE prize now", "see you at lunch"]
    results = json.loads((run / "results.json").read_text())
    lm = scratchlm.load(run)
    again = scratchlm.load(run)
    assert lm.classify(texts) == again.classify(texts) and results["train_mode"] == "lora"
    code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", data,
                           "--out", tmp_path / "x", *TRAIN, "--train", "lora", "--lora-targets", "qkv")
    one_line(code, err, "q_proj")


def test_classification_as_text_scores_are_the_answers_log_probabilities(tokenizer):
    """LabelText's score of each label equals the summed log-probability of ' LABEL' + EOS after the
    prompt, computed on the whole model's logits; the cached prefix changes nothing."""
    from scratchlm.finetune.classify import encode_as_text
    from scratchlm.training.logprobs import sequence_logprobs
    from scratchlm.training.losses import answer_loss

    tok = CharTokenizer.from_text("".join(x.text for x in examples()) + "?:\nPredict label: Label:",
                                  special_tokens=("<|endoftext|>",))
    torch.manual_seed(0)
    base = build_model(from_preset("tiny-llama", vocab_size=tok.vocab_size, context_length=64)).eval()
    head = LabelText.build(base, ["ham", "spam"], "Predict label: {text}\nLabel:", tok)
    assert head.answer_ids[0][-1] == tok.eos_id
    data = encode_as_text(examples(4), tok, head, 64)
    assert len(data) == 4 and len(data.rows) == 8
    [batch] = Collate(0, split=False)([data[i] for i in range(4)])
    scores = head(batch["input_ids"], targets=batch["targets"])
    for i in range(4):
        for c in range(2):
            row = data.rows[2 * i + c]
            ids = torch.tensor([row])
            target = torch.tensor([data.targets[2 * i + c]])
            direct = sequence_logprobs(base(ids), target)
            assert direct.count.item() == len(head.answer_ids[c])
            torch.testing.assert_close(scores[i, c], direct.sum[0], rtol=1e-5, atol=1e-5)
    cached = encode_as_text(examples(4), tok, head, 64)
    cache_prefix(base, cached, 1, pad=0)
    out = GroupedLoss(answer_loss)(head, Collate(0, 1)([cached[i] for i in range(4)]))
    torch.testing.assert_close(out.loss_sum, -scores.gather(1, batch["labels"][:, None]).sum(), rtol=1e-5,
                               atol=1e-5)


def test_finetune_classify_as_text(run_cli, tmp_path, base_run):
    data = write_data(tmp_path / "sms.tsv")
    run = tmp_path / "text"
    code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", data, "--out", run, *TRAIN,
                           "--as-text", "--prompt-template", "Predict: {text}\\nLabel:")
    assert code == 0, err
    payload = json.loads((run / "config.json").read_text())
    head = payload["head"]
    assert head["type"] == "label_text" and head["template"] == "Predict: {text}\nLabel:"
    results = json.loads((run / "results.json").read_text())
    assert results["as_text"] and 0 <= results["test_accuracy"] <= 1
    import scratchlm

    (label, prob), = scratchlm.load(run).classify(["WIN a FREE prize now"])
    assert label in ("ham", "spam") and 0.5 <= prob <= 1
    code, _, err = run_cli("finetune", "classify", "--model", base_run, "--data", data,
                           "--out", tmp_path / "y", *TRAIN, "--as-text", "--prompt-template", "no text")
    one_line(code, err, "{text}")


@pytest.mark.parametrize("as_text", [False, True])
def test_a_batch_cut_in_two_length_groups_gives_the_whole_batchs_loss_and_gradients(as_text):
    """Classification batches cut by length (``Collate``'s default) sum to the one padded batch:
    loss, accuracy and gradients, for a head and for classification as text."""
    from scratchlm.finetune.classify import encode_as_text
    from scratchlm.training.losses import answer_loss

    tokenizer = CharTokenizer.from_text("win now ham spam Predict label: Label:\n",
                                        special_tokens=("<|endoftext|>",))
    texts = [LabelledText("win " * n + "now", "spam" if n % 2 else "ham") for n in (30, 2, 28, 1, 3, 2)]
    results = []
    for split_batch in (True, False):
        torch.manual_seed(0)
        base = build_model(from_preset("tiny-llama", vocab_size=tokenizer.vocab_size, context_length=64))
        if as_text:
            model = LabelText.build(base, ["ham", "spam"], "Predict label: {text}\nLabel:", tokenizer)
            data, loss_fn = encode_as_text(texts, tokenizer, model, 64), answer_loss
        else:
            model, loss_fn = SequenceClassifier(base, ["ham", "spam"]), classification_loss
            data = encode(texts, tokenizer, ["ham", "spam"], 64)
        trainable_set(model, "all", 0.0)
        groups = Collate(0, split=split_batch)([data[i] for i in range(len(data))])
        assert len(groups) == (2 if split_batch else 1)
        out = GroupedLoss(loss_fn)(model, groups)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss_sum.detach(), out.metrics["accuracy"], out.count, grads))
    (loss_a, acc_a, n_a, grads_a), (loss_b, acc_b, n_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert acc_a == acc_b and n_a == n_b == len(texts) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)
