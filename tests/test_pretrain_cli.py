"""``scratchlm pretrain`` and ``scratchlm eval perplexity``: a tiny run, resume, and one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import ctrl_c_at
from scratchlm.checkpoint import io
from scratchlm.tokenizers import CharTokenizer

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n") * 15
TINY = ["--preset", "tiny-gpt2", "--context-length", "16", "--batch-size", "4", "--eval-every", "2",
        "--eval-batches", "1", "--sample-tokens", "8"]



@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors_and_write_nothing(run_cli, tmp_path, corpus):
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("too short for a window")
    saved_tok = tmp_path / "tok"
    CharTokenizer.from_text("abc").save(saved_tok)
    cases = [
        (["--data", tmp_path / "missing.txt"], "not found"),
        (["--data", empty], "empty"),
        (["--data", short], "fewer than one context window"),
        (["--data", corpus, "--preset", "tiny-gtp2"], "did you mean tiny-gpt2"),
        (["--data", corpus, "--preset", "tiny-gpt2", "--context-length", "128"],
         "longer than the 64 positions"),
        (["--data", corpus, "--tokenizer", "bpe:lots"], "bpe:N"),
        (["--data", corpus, "--tokenizer", tmp_path / "no-such-tokenizer"], "tokenizer not found"),
        (["--data", corpus, "--tokenizer", saved_tok], "not in the 3-character vocabulary"),
        (["--data", corpus, "--batch-size", "0", "--preset", "tiny-gpt2"], "batch_size"),
    ]
    for args, fragment in cases:
        code, _, err = run_cli("pretrain", *args, "--out", out, "--max-steps", "1")
        one_line_error(code, err, fragment)
        assert not out.exists(), args


def test_existing_run_dir_is_not_clobbered(run_cli, tmp_path, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli("pretrain", "--data", corpus, "--out", out, "--max-steps", "1")
    one_line_error(code, err, "already exists", "--resume")
    assert snapshot(out) == {out.joinpath("precious.txt").relative_to(out): b"keep me"}


def test_train_resume_and_evaluate(run_cli, tmp_path, corpus):
    run = tmp_path / "run"
    code, out, err = run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "4", "--out", run)
    assert code == 0, err
    assert f"run dir:    {run}" in out and "loss.png" in out and "--- sample" in out
    for name in ("config.json", "model.safetensors", "tokenizer", "train_state.safetensors",
                 "train_state.json", "metrics.jsonl", "loss.png", "samples.txt"):
        assert (run / name).exists(), name
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["tokenizer"] == "char" and data["val_fraction"] == 0.1

    before = snapshot(run)
    code, _, err = run_cli("pretrain", "--resume", run)
    one_line_error(code, err, "already reached its budget")
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "6", "--lr", "0.5")
    one_line_error(code, err, "--lr 0.5 differs")
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "6", "--preset", "gpt2-124m")
    one_line_error(code, err, "--preset gpt2-124m differs")
    assert snapshot(run) == before

    code, out, err = run_cli("pretrain", "--resume", run, "--max-steps", "6")
    assert code == 0, err
    assert json.loads((run / "train_state.json").read_text())["step"] == 6
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert steps == [2, 4, 6]

    code, out, err = run_cli("eval", "perplexity", "--model", run, "--data", corpus, "--split", "val",
                             "--stride", "8")
    assert code == 0, err
    values = dict(line.split(None, 1) for line in out.splitlines())
    assert float(values["perplexity"]) > 1 and float(values["nats/char"]) == pytest.approx(
        float(values["loss"].split()[0]), rel=1e-3)  # char level: nats per token = nats per char
    code, _, err = run_cli("eval", "perplexity", "--model", run, "--data", corpus, "--context-length", "99")
    one_line_error(code, err, "exceeds the model's 16 positions")


def test_raschka_ch5_options(run_cli, tmp_path, corpus):
    """Disjoint windows, epochs, a constant rate, no clipping, the book's model flags, and per-epoch
    evaluation on every window from the untrained model on (benchmarks/reproduce_raschka_ch5.py)."""
    run = tmp_path / "run"
    book = ["--preset", "tiny-gpt2", "--context-length", "16", "--stride", "16", "--batch-size", "8",
            "--epochs", "2", "--lr", "0.004", "--min-lr", "0.004", "--warmup-steps", "0", "--grad-clip", "0",
            "--beta2", "0.999", "--dropout", "0.1", "--no-qkv-bias", "--no-tie-embeddings",
            "--init", "pytorch", "--eval-every", "epoch", "--eval-batches", "0", "--eval-at-start",
            "--log-every", "1", "--sample-tokens", "4", "--data", corpus]
    code, _, err = run_cli("pretrain", *book, "--out", run)
    assert code == 0, err
    payload = json.loads((run / "config.json").read_text())
    model, training, data = payload["model"], payload["training"], payload["data"]
    assert (model["qkv_bias"], model["tie_embeddings"], model["dropout"]) == (False, False, 0.1)
    assert model["init"] == "pytorch"
    assert training["grad_clip"] is None and training["eval_every"] == "epoch" and training["eval_at_start"]
    assert data["stride"] == 16
    windows = (data["train_tokens"] - 1) // 16
    per_epoch = windows // 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["epochs"]) for r in evals] == [(0, 0), (per_epoch, 1), (2 * per_epoch, 2)]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 2 * per_epoch + 1))
    assert {r["lr"] for r in train} == {0.004}

    before = snapshot(run)
    for flag, value in (("--stride", "8"), ("--grad-clip", "1.0"), ("--qkv-bias", None), ("--init", "gpt2")):
        given = [flag, value] if value else [flag]
        code, _, err = run_cli("pretrain", "--resume", run, "--epochs", "3", *given)
        one_line_error(code, err, f"{flag} {value or True} differs")
    code, _, err = run_cli("pretrain", *book, "--stride", "0", "--out", tmp_path / "other")
    one_line_error(code, err, "--stride must be positive")
    assert snapshot(run) == before and not (tmp_path / "other").exists()
    code, _, err = run_cli("pretrain", "--resume", run, "--epochs", "3")
    assert code == 0, err
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epochs"] for r in evals if r["kind"] == "eval"] == [0, 1, 2, 3]  # no second step-0 eval


def test_a_tokenizer_bigger_than_the_model_is_refused(run_cli, tmp_path, corpus):
    run = tmp_path / "run"
    assert run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "1", "--out", run)[0] == 0
    # Swap in a tokenizer with more characters (ids shift past the model's vocabulary).
    CharTokenizer.from_text(TEXT + "0123456789").save(run / "tokenizer")
    before = snapshot(run)
    code, _, err = run_cli("pretrain", "--resume", run, "--max-steps", "2")
    one_line_error(code, err, "outside the model's vocabulary")
    assert snapshot(run) == before


def test_ctrl_c_saves_and_exits_130(run_cli, tmp_path, corpus):
    run = tmp_path / "run"
    with ctrl_c_at(2):
        code, _, err = run_cli("pretrain", *TINY, "--data", corpus, "--max-steps", "10", "--out", run)
    assert code == 130
    assert f"--resume {run}" in err
    assert json.loads((run / io.STATE_INFO_FILE).read_text())["step"] == 2
    assert io.load_run(run).config.name == "tiny-gpt2"


def test_bpe_run_reports_nats_per_char_over_characters(run_cli, tmp_path, corpus):
    """--tokenizer bpe:N to the end: the validation nats/char the run prints and logs is the validation
    NLL, recomputed here from the saved model, per *character* of the validation text."""
    import torch
    import torch.nn.functional as F

    import scratchlm

    run = tmp_path / "run"
    code, out, err = run_cli("pretrain", "--preset", "tiny-gpt2", "--context-length", "16",
                             "--batch-size", "4", "--tokenizer", "bpe:300", "--data", corpus,
                             "--max-steps", "3", "--eval-every", "3", "--eval-batches", "0",
                             "--precision", "fp32", "--sample-tokens", "0", "--out", run)
    assert code == 0, err
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["kind"] == "eval" and last["step"] == 3

    lm = scratchlm.load(run, device="cpu")
    val_text = TEXT[int(len(TEXT) * 0.9):]  # the last 10% of the characters
    ids = torch.tensor(lm.tokenizer.encode(val_text))
    assert len(ids) < 0.7 * len(val_text)  # BPE: far fewer tokens than characters
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 16, 16):  # disjoint validation windows, each with a next token
            x, y = ids[start:start + 16], ids[start + 1:start + 17]
            total += float(F.cross_entropy(lm.model(x[None])[0].double(), y, reduction="sum"))
            count += len(y)
    val_loss = total / count
    assert last["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    # the mean NLL per token times the validation text's tokens per character
    assert last["val_nats_per_char"] == pytest.approx(val_loss * len(ids) / len(val_text), rel=1e-5)
    assert f"{last['val_nats_per_char']:.4f} nats/char" in out
