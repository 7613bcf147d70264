"""The training loop: schedule, budgets, optimizer groups, accumulation, logging, loss going down."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.data.windows import SlidingWindowDataset
from scratchlm.errors import ConfigError, DataError
from scratchlm.models import build_model, from_preset
from scratchlm.runtime import resolve_precision
from scratchlm.tokenizers import CharTokenizer
from scratchlm.training import Budget, TrainConfig, Trainer, WarmupDecay, param_groups
from scratchlm.training.evaluators import LanguageModelEvaluator
from scratchlm.training.logging import read_metrics

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
        "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n") * 12



def quiet(**kw) -> TrainConfig:
    """A fast config for tests: no progress bar, no samples unless asked."""
    return TrainConfig(**{"progress": False, "warmup_steps": 2, "log_every": 1, **kw})


def char_data(context: int = 16):
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    split = int(0.9 * len(ids))
    train = SlidingWindowDataset(ids[:split], context, 1)
    return tok, train, SlidingWindowDataset(ids[split:], context, context)


def tiny_model(vocab: int, context: int = 16, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(from_preset("tiny-gpt2", vocab_size=vocab, context_length=context, **overrides))


# --- schedule and budgets ---------------------------------------------------------------------


def test_warmup_then_cosine_values():
    s = WarmupDecay(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert s(0, 0.0) == pytest.approx(1e-4)  # (0+1)/10 of the peak
    assert s(4, 0.0) == pytest.approx(5e-4)
    assert s(9, 0.0) == pytest.approx(1e-3)  # warmup ends at the peak
    assert s(10, 0.0) == pytest.approx(1e-3)
    assert s(50, 0.5) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down the cosine
    assert s(99, 1.0) == pytest.approx(1e-4)
    assert s(120, 1.7) == pytest.approx(1e-4)  # clamped past the end
    values = [s(step, step / 100) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone after warmup
    with pytest.raises(ConfigError):
        WarmupDecay(lr=1e-3, min_lr=2e-3)
    line = WarmupDecay(lr=1e-3, min_lr=1e-4, shape="linear")  # word2vec.c's straight-line decay
    assert line(0, 0.0) == pytest.approx(1e-3) and line(25, 0.25) == pytest.approx(1e-3 - 0.25 * 9e-4)
    assert line(100, 1.0) == pytest.approx(1e-4)
    linear = TrainConfig(max_steps=4, lr_schedule="linear", min_lr=0.0, warmup_steps=0).schedule()
    assert linear(2, 0.5) == pytest.approx(TrainConfig(max_steps=4).lr / 2)


def test_budget_progress_is_the_first_limit_reached():
    b = Budget(max_steps=100, max_time=60.0)
    assert b.progress(step=50, epochs=0.1, tokens=10, elapsed=15.0) == pytest.approx(0.5)
    assert b.progress(step=10, epochs=0.1, tokens=10, elapsed=45.0) == pytest.approx(0.75)
    assert Budget(max_tokens=1000).progress(3, 0, 250, 99.0) == pytest.approx(0.25)
    assert Budget(max_epochs=2).progress(3, 1.5, 250, 99.0) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="no budget"):
        Budget()
    with pytest.raises(ConfigError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_weight_decay_only_on_matrices():
    model = tiny_model(40)
    groups = param_groups(model.parameters(), 0.1)
    decay, no_decay = groups[0]["params"], groups[1]["params"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() < 2 for p in no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # tied head counted once
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay} >= {"embed_tokens.weight", "layers.0.self_attn.q_proj.weight"}
    assert "layers.0.input_layernorm.bias" in {names[id(p)] for p in no_decay}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_cross_entropy_sum_is_torchs(dtype, chunk_rows):
    """The chunked cross-entropy gives F.cross_entropy's summed loss and gradient, ignored targets too."""
    import torch.nn.functional as F

    from scratchlm.training.losses import IGNORE_INDEX, cross_entropy_sum

    torch.manual_seed(0)
    logits = (torch.randn(37, 101) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (37,))
    targets[[2, 5, 30]] = IGNORE_INDEX
    ours = cross_entropy_sum(logits, targets, chunk_rows=chunk_rows)
    theirs = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)
    (grad,), (reference,) = (torch.autograd.grad(loss * 0.37, logits) for loss in (ours, theirs))
    assert grad.dtype == dtype and not grad[[2, 5, 30]].any()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(grad, reference, **tol)  # bf16: both round the same float32 gradient
    with torch.no_grad():  # evaluation: no graph
        torch.testing.assert_close(cross_entropy_sum(logits, targets, chunk_rows=chunk_rows), theirs.detach())


def test_trainer_keeps_freed_memory_on_the_cpu(monkeypatch):
    """glibc malloc tuning (large blocks reused instead of unmapped): applied by a CPU Trainer, idempotent."""
    import platform
    import sys

    from scratchlm import runtime

    applied = runtime.keep_freed_memory()
    assert applied == runtime.keep_freed_memory()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert applied
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1))
    tok, train, _ = char_data()
    Trainer(tiny_model(tok.vocab_size), quiet(batch_size=4, max_steps=1, precision="fp32"), train)
    assert calls == [1]


def test_precision_auto_follows_the_hardware(monkeypatch):
    from scratchlm import runtime

    monkeypatch.setattr(runtime, "fast_bf16", lambda device: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_fast_bf16_on_cpus_with_amx_or_avx512_bf16(monkeypatch):
    """AMX (Sapphire Rapids) or AVX512-BF16 (Zen 4) each make bf16 matmuls fast; neither: fp32."""
    from scratchlm.runtime import fast_bf16

    cpu = torch.device("cpu")
    for amx, avx512_bf16 in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert fast_bf16(cpu) == (amx or avx512_bf16)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch without the checks
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert fast_bf16(cpu) is False


def test_auto_precision_probes_the_cpu(monkeypatch):
    """On a CPU with fast bf16, 'auto' times both precisions on this model and keeps the faster one."""
    from scratchlm import runtime
    from scratchlm.training import precision

    tok, train, _ = char_data()
    monkeypatch.setattr(runtime, "fast_bf16", lambda device: True)
    t = Trainer(tiny_model(tok.vocab_size), quiet(batch_size=4, max_steps=1), train)
    assert t.precision == "fp32" and "not probed" in t._probe_note  # too small to be worth timing
    monkeypatch.setattr(precision, "PROBE_MIN_PARAMETERS", 0)
    original = precision.probe_bf16
    for bf16_seconds, expected in ((0.5, "bf16"), (0.95, "fp32")):
        def probe(step, s=bf16_seconds):
            original(step, rounds=1)  # the real forward/backward passes run, on a copy of the model
            return 1.0, s

        monkeypatch.setattr(precision, "probe_bf16", probe)
        model = tiny_model(tok.vocab_size)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        t = Trainer(model, quiet(batch_size=4, max_steps=1), train)
        assert t.precision == expected and expected in t._probe_note
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_probe_bf16_times_both_precisions_after_a_warm_up():
    from scratchlm.training.precision import probe_bf16

    calls = []

    def step(bf16):
        calls.append(bf16)
        return 0.5 if bf16 else 1.0 + len(calls)

    assert probe_bf16(step, rounds=2) == (4.0, 0.5)
    assert calls == [False, True, False, True, False, True]


# --- the loop ---------------------------------------------------------------------------------


def test_loss_decreases_and_the_run_dir_is_complete(tmp_path):
    tok, train, val = char_data()
    model = tiny_model(tok.vocab_size)
    run = tmp_path / "run"
    cfg = quiet(batch_size=16, max_steps=30, eval_every=15, lr=1e-2, log_every=1)
    evaluator = LanguageModelEvaluator(tokenizer=tok, tokens_per_char=1.0, sample_tokens=20)
    trainer = Trainer(model, cfg, train, val_data=val, run_dir=run, tokenizer=tok, evaluator=evaluator)
    result = trainer.fit()
    assert result.step == 30 and result.tokens == 30 * 16 * 16
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    for r in evals:
        assert {"step", "tokens", "elapsed", "train_loss", "val_loss", "val_nats_per_char", "lr",
                "val_perplexity"} <= set(r)
        assert r["val_nats_per_char"] == pytest.approx(r["val_loss"])  # char level: one token per char
        assert r["val_perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    first_train = next(r for r in records if r["kind"] == "train")
    assert evals[-1]["val_loss"] < math.log(tok.vocab_size) - 0.5  # well below uniform guessing
    assert evals[-1]["train_loss"] < first_train["loss"] - 0.5
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (run / "samples.txt").read_text()
    assert "=== step 15" in samples and "=== step 30" in samples
    assert json.loads((run / "config.json").read_text())["training"]["max_steps"] == 30
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_grad_accumulation_equals_the_bigger_batch():
    tok, train, _ = char_data()
    results = []
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        model = tiny_model(tok.vocab_size, seed=3)
        Trainer(model, quiet(batch_size=batch_size, grad_accum=accum, max_steps=3, eval_every=0), train).fit()
        results.append(model.state_dict())
    for other in results[1:]:
        for name, value in results[0].items():
            torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-6)


def test_masked_targets_weigh_by_token_count():
    """Micro-batches with different numbers of real targets still give the whole batch's mean."""
    tok, train, _ = char_data()

    class Masked:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            x, y = train[i]
            y = y.clone()
            y[: (i % 4) * 4] = -100  # 0, 4, 8 or 12 masked targets
            return x, y

    results = []
    for batch_size, accum in ((8, 1), (2, 4)):
        model = tiny_model(tok.vocab_size, seed=4)
        Trainer(model, quiet(batch_size=batch_size, grad_accum=accum, max_steps=2, eval_every=0, seed=9),
                Masked()).fit()
        results.append(model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6)


def test_epoch_and_token_budgets():
    tok, train, _ = char_data()
    coarse = SlidingWindowDataset(train.ids, 16, 16)  # ~170 disjoint windows
    t = Trainer(tiny_model(tok.vocab_size), quiet(batch_size=32, max_epochs=2.0, eval_every=0), coarse)
    t.fit()
    per_epoch = len(coarse) // 32  # the incomplete last batch of an epoch is dropped
    assert t.step == 2 * per_epoch
    assert (t.epoch, t.position) == (2, 0)
    t = Trainer(tiny_model(tok.vocab_size), quiet(batch_size=4, max_tokens=4 * 16 * 3, eval_every=0), train)
    assert t.fit().step == 3


def test_eval_per_epoch_on_every_window_and_before_training(tmp_path):
    """Raschka ch. 5's figures: losses over the whole train and validation splits, the untrained
    model first, then after every epoch; a constant rate (min_lr = lr, no warmup), no clipping."""
    tok, train, val = char_data()
    coarse = SlidingWindowDataset(train.ids, 16, 16)
    per_epoch = len(coarse) // 8
    model = tiny_model(tok.vocab_size, dropout=0.1)
    cfg = quiet(batch_size=8, max_epochs=3, eval_every="epoch", eval_batches=0, eval_at_start=True,
                lr=3e-3, min_lr=3e-3, warmup_steps=0, grad_clip=None)
    result = Trainer(model, cfg, coarse, val_data=val, run_dir=tmp_path / "run").fit()
    assert result.step == 3 * per_epoch
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["epochs"]) for r in evals] == [(k * per_epoch, k) for k in range(4)]
    assert {r["lr"] for r in records if r["kind"] == "train"} == {3e-3}  # constant
    assert evals[0]["tokens"] == 0
    assert evals[0]["train_loss"] == pytest.approx(math.log(tok.vocab_size), abs=0.2)  # untrained
    assert evals[-1] == {**result.last_eval, "final": True}

    # "Every window": the evaluation equals the mean token loss over the whole splits, computed here.
    model.eval()
    with torch.no_grad():
        for data, key in ((coarse, "train_loss"), (val, "val_loss")):
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.stack([data[i][1] for i in range(len(data))])
            want = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
            assert result.last_eval[key] == pytest.approx(want, rel=1e-5)


def test_eval_every_and_eval_batches_are_checked():
    with pytest.raises(ConfigError, match="'epoch'"):
        TrainConfig(max_steps=1, eval_every="weekly")
    with pytest.raises(ConfigError, match="eval_batches"):
        TrainConfig(max_steps=1, eval_batches=-1)
    assert TrainConfig(max_steps=1, eval_batches=0, eval_every="epoch").eval_batches == 0


def test_time_budget_stops_and_decays_to_min_lr():
    tok, train, val = char_data()
    cfg = quiet(batch_size=4, max_time=1.5, eval_every=0, lr=1e-3, min_lr=1e-4, warmup_steps=0)
    t = Trainer(tiny_model(tok.vocab_size), cfg, train, val_data=val)
    result = t.fit()
    assert result.step >= 1 and 1.5 <= result.elapsed < 30
    # The cosine runs over the elapsed fraction of the budget: the last update's rate is min_lr, up to
    # the fraction of a step (a few ms of 1.5 s, on a loaded machine ~0.1 s: < 1% of the range).
    final = t.optimizer.param_groups[0]["lr"]
    assert 1e-4 <= final <= 1e-4 + 0.05 * (1e-3 - 1e-4)


def test_bf16_autocast_keeps_fp32_master_weights():
    tok, train, val = char_data()
    model = tiny_model(tok.vocab_size)
    t = Trainer(model, quiet(batch_size=4, max_steps=2, eval_every=2, precision="bf16"), train, val_data=val,
                evaluator=LanguageModelEvaluator(tokens_per_char=1.0))
    result = t.fit()
    assert t.precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(result.last_eval["val_loss"])


def test_too_little_data_for_one_batch():
    tok, train, _ = char_data()
    small = SlidingWindowDataset(torch.arange(20) % tok.vocab_size, 16, 1)
    with pytest.raises(DataError, match="fewer than one batch"):
        Trainer(tiny_model(tok.vocab_size), quiet(batch_size=8, max_steps=1), small)
