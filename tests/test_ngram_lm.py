"""The n-gram LM behind the transformer's interface: NGramLM, its run dirs, and the pretrain CLI path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm.checkpoint import io
from scratchlm.data.corpora import read_corpus
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.models import ModelConfig, build_model, from_preset
from scratchlm.models.ngram import NGramCounts
from scratchlm.models.ngram_module import NGramLM
from scratchlm.tokenizers import CharTokenizer

TEXT = read_corpus("builtin:tinyshakespeare")[:12_000]


@pytest.fixture(scope="module")
def char_data():
    tok = CharTokenizer.from_text(TEXT)
    split = int(len(TEXT) * 0.9)
    return tok, tok.encode(TEXT[:split]), tok.encode(TEXT[split:])


def direct_log2(order, smoothing, train_ids, ids):
    """log2 P of every token of ``ids``: NGramCounts itself, fitted on the ids as words (no padding)."""
    lm = NGramCounts(order, smoothing, pad=False).fit([[str(i) for i in train_ids]])
    return lm, lm.token_logscores([[str(i) for i in ids]])


@pytest.mark.parametrize("preset", ["ngram-kn5", "ngram-laplace3"])
def test_logits_token_nats_and_ngramlm_agree(preset, char_data):
    tok, train, val = char_data
    config = from_preset(preset, vocab_size=tok.vocab_size)
    model = NGramLM.fit(config, train)
    lm, log2p = direct_log2(config.ngram_order, config.ngram_smoothing, train, val[:200])
    nats = model.token_nats(val[:200])
    assert set(val) <= set(train)  # no <UNK> share to correct for: the n-gram's own numbers
    np.testing.assert_allclose(nats, -log2p * math.log(2), rtol=0, atol=1e-12)
    logits = model(torch.tensor([val[:200]]))  # position t predicts token t + 1
    assert logits.shape == (1, 200, tok.vocab_size) and logits.dtype == torch.float32
    picked = logits[0, torch.arange(199), torch.tensor(val[1:200])].double().numpy()
    np.testing.assert_allclose(-picked, nats[1:], rtol=1e-6)
    # each row is ln of NGramCounts.distribution after the N-1 tokens up to that position
    L = config.ngram_order - 1
    for t in (0, 1, 57, 199):
        context = [str(i) for i in val[max(0, t - L + 1) : t + 1]]
        dist = lm.distribution(context)
        expected = [math.log(dist[lm.vocab.index(str(i))]) for i in range(tok.vocab_size)]
        np.testing.assert_allclose(logits[0, t].double().numpy(), expected, rtol=1e-6)
        # the probabilities miss only <UNK>'s, which no token owns here (softmax renormalises)
        assert float(logits[0, t].double().exp().sum()) == pytest.approx(1 - dist[0], abs=1e-6)
    assert (
        model.num_parameters()
        == lm.num_counts
        == sum(len(lm.tables()[f"counts.{k}"]) for k in range(1, config.ngram_order + 1))
    )


def test_unseen_token_ids_share_the_unk_probability(char_data):
    tok, train, _ = char_data
    config = from_preset("ngram-kn5", vocab_size=tok.vocab_size + 3)  # three ids training never shows
    model = NGramLM.fit(config, train)
    logp = model(torch.tensor([train[:50]]))[0].double()
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, atol=1e-6)  # a distribution again
    unseen = logp[:, tok.vocab_size :]
    np.testing.assert_allclose(unseen.numpy(), unseen[:, :1].expand_as(unseen).numpy())  # equal shares
    ids = train[:10] + [tok.vocab_size + 1]
    assert model.token_nats(ids)[-1] == pytest.approx(-float(logp[9, tok.vocab_size + 1]), rel=1e-6)


def test_cached_and_batched_generation_equal_a_full_forward(char_data):
    tok, train, val = char_data
    model = NGramLM.fit(from_preset("ngram-kn5", vocab_size=tok.vocab_size), train)
    ids = torch.tensor([val[:40]])
    full = model(ids)
    cache = model.new_cache(1)
    pieces = [model(ids[:, :7], cache=cache), *(model(ids[:, t : t + 1], cache=cache) for t in range(7, 40))]
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    assert cache.length == 40
    lm = scratchlm.LM(model, tok, model.config)
    prompts = ["ROMEO:\n", "To be", "What"]
    alone = [lm.generate(p, temperature=0, max_new_tokens=25) for p in prompts]
    together = [c.text for c in lm.complete(prompts, temperature=0, max_new_tokens=25)]
    assert together == alone and all(len(t) == 25 for t in alone)
    sampled = lm.generate("ROMEO:", max_new_tokens=40, seed=3, top_k=5)
    assert sampled == lm.generate("ROMEO:", max_new_tokens=40, seed=3, top_k=5) and set(sampled) <= set(TEXT)


def test_run_dir_round_trip_and_damaged_weights(char_data, tmp_path):
    tok, train, val = char_data
    config = from_preset("ngram-laplace3", vocab_size=tok.vocab_size)
    model = NGramLM.fit(config, train)
    io.save_run(tmp_path / "run", model, config, tok)
    lm = scratchlm.load(tmp_path / "run", device="cpu")
    assert isinstance(lm.model, NGramLM) and lm.config == config
    ids = torch.tensor([val[:64]])
    torch.testing.assert_close(lm.model(ids), model(ids), rtol=0, atol=0)
    assert lm.model.num_parameters() == model.num_parameters()
    # tensors of another order do not load
    tensors = {k: v for k, v in model.state_dict().items() if k != "counts.3"}
    io.save_tensors_atomic(tmp_path / "run" / io.WEIGHTS_FILE, tensors)
    with pytest.raises(CheckpointError, match="counts.3 missing"):
        scratchlm.load(tmp_path / "run")


def test_config_validation():
    with pytest.raises(ConfigError, match="cannot drive a language model"):
        from_preset("ngram-kn5", ngram_smoothing="stupid-backoff")
    with pytest.raises(ConfigError, match="ngram_order must be"):
        from_preset("ngram-kn5", ngram_order=0)
    with pytest.raises(ConfigError, match="Kneser-Ney needs"):
        from_preset("ngram-kn5", ngram_order=1)
    with pytest.raises(ConfigError, match="ngram_order is set but arch is 'transformer'"):
        ModelConfig(ngram_order=3)
    with pytest.raises(ConfigError, match="distinct n-grams"):
        from_preset("ngram-kn5").num_parameters()
    unfitted = build_model(from_preset("ngram-laplace3"))
    assert isinstance(unfitted, NGramLM) and unfitted.num_parameters() == 0
    with pytest.raises(ConfigError, match="not been fitted"):
        unfitted(torch.zeros(1, 3, dtype=torch.long))
    config = from_preset("ngram-kn5")
    assert ModelConfig.from_dict(config.to_dict()) == config


# ----------------------------------------------------------------------------------------------
# scratchlm pretrain --preset ngram-*
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def pretrain(run_cli, preset, data_file, out, *extra):
    return run_cli("pretrain", "--preset", preset, "--data", data_file, "--out", out, *extra)


@pytest.mark.parametrize("preset", ["ngram-kn5", "ngram-laplace3"])
def test_pretrain_cli_counts_reports_loads_and_generates(preset, data_file, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = pretrain(run_cli, preset, data_file, out, "--sample-tokens", "30", "--threads", "1")
    assert code == 0, err
    assert all(
        (out / name).exists() for name in ("config.json", "model.safetensors", "tokenizer", "samples.txt")
    )
    assert not (out / io.STATE_INFO_FILE).exists()  # nothing to resume
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "eval"]
    final = records[-1]
    # the same figure as a direct NGramCounts computation on the demo's split: total nats / validation chars
    split = int(len(TEXT) * 0.9)
    tok = CharTokenizer.from_text(TEXT)
    train, val = tok.encode(TEXT[:split]), tok.encode(TEXT[split:])
    config = from_preset(preset)
    lm, log2p = direct_log2(config.ngram_order, config.ngram_smoothing, train, val)
    nats_per_char = -log2p.sum() * math.log(2) / len(TEXT[split:])
    assert final["val_nats_per_char"] == pytest.approx(nats_per_char, rel=1e-12)
    assert final["val_loss"] == pytest.approx(-log2p.mean() * math.log(2), rel=1e-12)
    assert final["final"] is True and final["tokens"] == len(train)
    assert f"{nats_per_char:.4f} nats/char" in stdout and f"{lm.num_counts:,} n-gram counts" in stdout

    loaded = scratchlm.load(out)
    assert loaded.config.arch == "ngram" and loaded.model.num_parameters() == lm.num_counts
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "40", "--seed", "1", "--device", "cpu"]
    code, text, err = run_cli("generate", "--model", out, *args)
    assert code == 0, err
    assert 0 < len(text) <= 40 + 1 and set(text) <= set(TEXT) | {"\n"}


def test_pretrain_cli_ngram_records_have_the_neural_fields(data_file, tmp_path, run_cli):
    tiny = ["--context-length", "16", "--batch-size", "2", "--max-steps", "10", "--eval-batches", "1"]
    code, _, err = pretrain(run_cli, "tiny-gpt2", data_file, tmp_path / "gpt", *tiny, "--sample-tokens", "0")
    assert code == 0, err
    code, _, err = pretrain(run_cli, "ngram-kn5", data_file, tmp_path / "ng", "--sample-tokens", "0")
    assert code == 0, err

    def fields(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {kind: set().union(*(r for r in records if r["kind"] == kind)) for kind in ("train", "eval")}

    assert fields("ng") == fields("gpt")


BAD_OPTIONS = [
    (["--lr", "0.1"], "error: --lr means nothing to the count-based preset ngram-kn5"),
    (["--max-time", "10"], "error: --max-time means nothing"),
    (["--context-length", "8"], "error: --context-length means nothing"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS)
def test_pretrain_cli_rejects_training_options(args, message, data_file, tmp_path, run_cli):
    code, _, err = pretrain(run_cli, "ngram-kn5", data_file, tmp_path / "r", *args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_pretrain_cli_ngram_run_cannot_resume(data_file, tmp_path, run_cli):
    out = tmp_path / "run"
    assert pretrain(run_cli, "ngram-laplace3", data_file, out, "--sample-tokens", "0")[0] == 0
    code, _, err = pretrain(run_cli, "ngram-laplace3", data_file, out)
    assert code == 2 and err.startswith(f"error: {out} already exists") and "not resumed" in err
    code, _, err = run_cli("pretrain", "--resume", out)
    assert code == 2 and err.startswith("error: an n-gram run has nothing to resume") and err.count("\n") == 1
