"""Recurrent LMs: Elman RNN and LSTM against torch.nn.RNN / nn.LSTM, Burkov's parameter count,
the transformer's protocol (cache, attention mask, sampler), and a tiny run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ctrl_c_at
from scratchlm.errors import ConfigError
from scratchlm.models import ModelConfig, build_empty_model, build_model, from_preset
from scratchlm.models.rnn import LSTM, ElmanRNN, RecurrentLM, RecurrentState

TORCH = {ElmanRNN: torch.nn.RNN, LSTM: torch.nn.LSTM}



def random_lm(preset: str, **overrides) -> RecurrentLM:
    """A tiny recurrent LM with weights large enough that greedy decoding does not just repeat."""
    torch.manual_seed(0)
    model = build_model(from_preset(preset, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


# -------------------------------------------------------------------------------------------
# The layers against torch, on the same weights
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ElmanRNN, LSTM])
@pytest.mark.parametrize("reference", [False, True])
def test_matches_torch_outputs_states_and_gradients(cls, reference):
    torch.manual_seed(0)
    ours = cls(5, 7, num_layers=3)
    with torch.no_grad():  # non-zero biases, so that a misplaced bias shows
        for p in ours.parameters():
            p.uniform_(-0.5, 0.5)
    ours.use_reference = reference
    theirs = TORCH[cls](5, 7, num_layers=3, batch_first=True)
    theirs.load_state_dict(ours.state_dict())  # same names and shapes
    x = torch.randn(4, 9, 5)
    h0 = torch.randn(3, 4, 7)
    state = (h0, torch.randn(3, 4, 7)) if cls is LSTM else h0
    out, final = ours(x, state)
    ref_out, ref_final = theirs(x, state)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    states = zip(final, ref_final, strict=True) if cls is LSTM else [(final, ref_final)]
    for a, b in states:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # Zero initial state when none is given.
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=0)
    # Gradients of every weight, through outputs and final states.
    loss = out.square().sum() + (final[1] if cls is LSTM else final).sum()
    ref_loss = ref_out.square().sum() + (ref_final[1] if cls is LSTM else ref_final).sum()
    grads = torch.autograd.grad(loss, list(ours.parameters()))
    ref_grads = torch.autograd.grad(ref_loss, list(theirs.parameters()))
    for (name, _), g, r in zip(ours.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cls", [ElmanRNN, LSTM])
def test_single_bias_is_torch_with_zero_b_hh(cls):
    """Burkov's one b per layer = torch's b_ih + b_hh with b_hh = 0."""
    torch.manual_seed(1)
    ours = cls(6, 6, num_layers=2, bias="one")
    assert not any(name.startswith("bias_hh") for name, _ in ours.named_parameters())
    theirs = TORCH[cls](6, 6, num_layers=2, batch_first=True)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.zeros_like(p) if name.startswith("bias_hh") else getattr(ours, name))
    x = torch.randn(3, 5, 6)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=0)
    assert not any("bias" in name for name, _ in cls(6, 6, bias="none").named_parameters())


def test_fast_and_reference_paths_agree_with_a_mask_and_in_training_mode_without_dropout():
    torch.manual_seed(2)
    lstm = LSTM(4, 8, num_layers=2).train()
    x = torch.randn(3, 7, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    fast = lstm(x, mask=mask)
    lstm.use_reference = True
    ref = lstm(x, mask=mask)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-6, rtol=0)


def test_lstm_starts_with_forget_gate_bias_one():
    lstm = LSTM(3, 4, num_layers=2)
    for k in range(2):
        b_ih, b_hh = getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}")
        assert torch.all((b_ih + b_hh)[4:8] == 1) and torch.all(b_ih[:4] == 0) and torch.all(b_ih[8:] == 0)


def test_dropout_only_between_layers_and_only_in_training():
    torch.manual_seed(3)
    rnn = ElmanRNN(4, 4, num_layers=2, dropout=0.5)
    x = torch.randn(2, 5, 4)
    rnn.eval()
    assert torch.equal(rnn(x)[0], rnn(x)[0])
    rnn.train()
    assert not torch.equal(rnn(x)[0], rnn(x)[0])
    single = ElmanRNN(4, 4, num_layers=1, dropout=0.5).train()  # nothing between layers: no dropout
    assert torch.equal(single(x)[0], single(x)[0])


# -------------------------------------------------------------------------------------------
# Config and parameter counts
# -------------------------------------------------------------------------------------------


def test_burkov_rnn_parameter_count_o33():
    """B §3.6: 8,292,619 = Phi-3.5's V = 32,011, embedding 128, 2 Elman layers, one bias each, untied
    biased head: V·128 (embedding) + (V·128 + V) (head) + 2·(2·128² + 128) (layers) = 257·V + 65,792."""
    v = 32011
    config = ModelConfig(arch="elman", vocab_size=v, n_layer=2, n_embd=128, rnn_bias="one",
                         tie_embeddings=False)
    assert v * 128 + (v * 128 + v) + 2 * (2 * 128**2 + 128) == 257 * v + 65_792 == 8_292_619
    assert config.num_parameters() == 8_292_619
    with torch.device("meta"):
        model = build_model(config)
    assert model.num_parameters() == 8_292_619
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "embed_tokens.weight": (v, 128),
        "rnn.weight_ih_l0": (128, 128), "rnn.weight_hh_l0": (128, 128), "rnn.bias_ih_l0": (128,),
        "rnn.weight_ih_l1": (128, 128), "rnn.weight_hh_l1": (128, 128), "rnn.bias_ih_l1": (128,),
        "lm_head.weight": (v, 128), "lm_head.bias": (v,),
    }
    # torch.nn.RNN's two biases per layer would add 2·128.
    assert config.replace(rnn_bias="two").num_parameters() == 8_292_619 + 256


@pytest.mark.parametrize("arch", ["elman", "lstm"])
@pytest.mark.parametrize("variant", [
    dict(), dict(tie_embeddings=False), dict(rnn_bias="one"), dict(rnn_bias="none", n_layer=3),
    dict(rnn_hidden=48, tie_embeddings=False), dict(n_layer=1),
])
def test_num_parameters_matches_the_module(arch, variant):
    config = ModelConfig(**{"arch": arch, "vocab_size": 50, "n_embd": 16, "n_layer": 2, **variant})
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, RecurrentLM)
    assert config.num_parameters() == model.num_parameters()


@pytest.mark.parametrize("name", ["tiny-elman", "tiny-lstm", "elman-small", "lstm-small"])
def test_presets_build_and_count(name):
    config = from_preset(name)
    with torch.device("meta"):
        model = build_model(config)
    assert config.num_parameters() == model.num_parameters()
    untied = config.replace(tie_embeddings=not config.tie_embeddings)
    assert untied.num_parameters() == sum(p.numel() for p in RecurrentLM(untied).parameters())


@pytest.mark.parametrize("overrides, fragment", [
    (dict(arch="gru"), "unknown arch 'gru'"),
    (dict(arch="lstm", rnn_bias="three"), "unknown rnn_bias"),
    (dict(arch="lstm", rnn_hidden=0), "rnn_hidden must be a positive integer"),
    (dict(arch="elman", n_layer=0), "n_layer must be a positive integer"),
    (dict(arch="elman", dropout=1.0), "dropout must be in [0, 1)"),
    (dict(arch="lstm", n_embd=32, rnn_hidden=64), "tied embeddings need the hidden size"),
])
def test_bad_configs_are_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**overrides)
    assert fragment in str(err.value) and " — " in str(err.value)


def test_config_round_trips_and_rnn_ignores_transformer_only_sizes():
    # n_embd 100 is not divisible by the default 12 heads: irrelevant to a recurrent model.
    config = ModelConfig(arch="lstm", n_embd=100, rnn_hidden=60, tie_embeddings=False, vocab_size=70)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.rnn_size == 60 and ModelConfig(arch="elman", n_embd=24).rnn_size == 24


def test_backward_reaches_every_parameter():
    for name in ("tiny-elman", "tiny-lstm"):
        torch.manual_seed(0)
        model = build_model(from_preset(name, dropout=0.1)).train()
        ids = torch.randint(0, 256, (3, 12))
        logits = model(ids)
        assert logits.shape == (3, 12, 256)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)


def test_tied_head_shares_the_embedding_and_empty_model_keeps_the_tie():
    model = build_model(from_preset("tiny-lstm"))
    assert model.lm_head.weight is model.embed_tokens.weight
    empty = build_empty_model(from_preset("tiny-lstm"))
    assert isinstance(empty, RecurrentLM) and empty.lm_head.weight is empty.embed_tokens.weight
    empty.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(empty(ids), model(ids))


# -------------------------------------------------------------------------------------------
# The transformer's protocol: cache, attention mask, sampler
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-elman", "tiny-lstm"])
def test_cached_step_by_step_decoding_equals_the_full_forward(preset):
    model = random_lm(preset)
    ids = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, 16)
        assert isinstance(cache, RecurrentState) and cache.length == 0 and cache.max_length == 16
        pieces = [model(ids[:, :4], cache=cache)]  # prefill
        assert cache.length == 4
        for t in range(4, 10):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
        assert cache.length == 10
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
        # select(rows) keeps rows: continuing rows 2 and 0 equals continuing them in the full batch.
        nxt = torch.randint(0, 256, (3, 1))
        expected = model(nxt, cache=_copy(cache))[[2, 0]]
        cache.select(torch.tensor([2, 0]))
        torch.testing.assert_close(model(nxt[[2, 0]], cache=cache), expected, atol=1e-6, rtol=0)


def _copy(cache: RecurrentState) -> RecurrentState:
    clone = RecurrentState(cache.h.clone(), None if cache.c is None else cache.c.clone(), cache.max_length)
    clone.length = cache.length
    return clone


@pytest.mark.parametrize("preset", ["tiny-elman", "tiny-lstm"])
def test_left_padded_batch_with_attention_mask_equals_each_row_alone(preset):
    model = random_lm(preset)
    rows = [[5, 9, 2, 7, 1, 3], [8, 4], [6, 6, 1, 200]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what the sampler passes; ignored by the RNN
    with torch.no_grad():
        cache = model.new_cache(len(rows), width + 3)
        batched = model(ids, cache=cache, attention_mask=mask, position_ids=positions)
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))
            torch.testing.assert_close(batched[i, width - len(row):], alone[0], atol=1e-5, rtol=0)
        # One more token per row, with the whole mask so far (as the sampler passes it).
        nxt = torch.tensor([[11], [12], [13]])
        full_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
        stepped = model(nxt, cache=cache, attention_mask=full_mask)
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row + [11 + i]]))
            torch.testing.assert_close(stepped[i, -1], alone[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="columns"):
        model(ids, cache=model.new_cache(3), attention_mask=mask[:, :2])


def test_right_padding_leaves_the_state_of_the_last_real_token():
    model = random_lm("tiny-lstm")
    ids = torch.tensor([[4, 5, 6, 0, 0]])
    with torch.no_grad():
        cache = model.new_cache(1)
        model(ids, cache=cache, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
        alone = model.new_cache(1)
        model(ids[:, :3], cache=alone)
    torch.testing.assert_close(cache.h, alone.h, atol=1e-6, rtol=0)
    torch.testing.assert_close(cache.c, alone.c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", ["tiny-elman", "tiny-lstm"])
def test_sampler_batches_prompts_of_different_lengths_like_each_alone(preset):
    from scratchlm.generation import SamplingParams, generate_ids

    model = random_lm(preset)
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    batched = generate_ids(model, prompts, greedy)
    for prompt, result in zip(prompts, batched, strict=True):
        assert result.token_ids == generate_ids(model, [prompt], greedy)[0].token_ids
        assert len(result.token_ids) == 8
    # Greedy decoding through the cache equals re-running the whole sequence every step.
    seq = [1, 2, 3]
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert generate_ids(model, [[1, 2, 3]], greedy)[0].token_ids == seq[3:]


# -------------------------------------------------------------------------------------------
# The same loop and CLI as the transformer: pretrain, resume, load, evaluate, generate
# -------------------------------------------------------------------------------------------

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n") * 15
TINY = ["--context-length", "16", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
        "--sample-tokens", "8"]


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    """A tiny LSTM trained by 'scratchlm pretrain': interrupted (Ctrl-C) at step 4 of 6 and resumed,
    and the same 6 steps in one go."""
    from scratchlm.cli import main

    root = tmp_path_factory.mktemp("rnn-run")
    corpus = root / "text.txt"
    corpus.write_text(TEXT)
    run, straight = root / "run", root / "straight"
    args = ["pretrain", "--preset", "tiny-lstm", *TINY, "--data", str(corpus), "--max-steps", "6"]
    with ctrl_c_at(4):
        assert main([*args, "--out", str(run)]) == 130
    assert json.loads((run / "train_state.json").read_text())["step"] == 4
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert main([*args, "--out", str(straight)]) == 0
    return corpus, run, straight


def test_pretrain_through_the_cli_saves_and_resumes_exactly(lstm_run, capsys):
    from safetensors.torch import load_file

    _, run, straight = lstm_run
    capsys.readouterr()
    for name in ("config.json", "model.safetensors", "tokenizer", "train_state.json", "metrics.jsonl",
                 "samples.txt"):
        assert (run / name).exists(), name
    model_config = json.loads((run / "config.json").read_text())["model"]
    assert model_config["arch"] == "lstm" and model_config["context_length"] == 16
    assert json.loads((run / "train_state.json").read_text())["step"] == 6
    resumed, once = load_file(run / "model.safetensors"), load_file(straight / "model.safetensors")
    assert set(resumed) == set(once) and "rnn.weight_hh_l1" in resumed
    for key in resumed:
        assert torch.equal(resumed[key], once[key]), key  # interrupted + resumed = in one go, bit for bit


def test_scratchlm_load_generates_and_evaluates_an_rnn_run(lstm_run, run_cli):
    import scratchlm

    corpus, run, _ = lstm_run
    lm = scratchlm.load(run, device="cpu")
    assert isinstance(lm.model, RecurrentLM) and lm.config.arch == "lstm"
    text = lm.generate("ROMEO", max_new_tokens=10, temperature=0)
    assert isinstance(text, str) and 0 < len(text) <= 10
    code, out, err = run_cli("eval", "perplexity", "--model", run, "--data", corpus, "--split", "val")
    assert code == 0, err
    assert float(dict(line.split(None, 1) for line in out.splitlines())["perplexity"]) > 1
