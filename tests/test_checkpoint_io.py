"""Run dirs: save/load round trip, atomic writes, exact resume, and the errors that protect a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchlm.checkpoint import io
from scratchlm.data.windows import SlidingWindowDataset
from scratchlm.errors import CheckpointError
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers import CharTokenizer
from scratchlm.training import LanguageModelEvaluator, TrainConfig, Trainer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20



@pytest.fixture(scope="module")
def data():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    split = int(0.9 * len(ids))
    return tok, SlidingWindowDataset(ids[:split], 16, 1), SlidingWindowDataset(ids[split:], 16, 16)


def make_model(vocab: int, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(from_preset("tiny-gpt2", vocab_size=vocab, context_length=16, **overrides))


def config(**kw) -> TrainConfig:
    base = dict(batch_size=4, grad_accum=2, max_steps=12, eval_every=4, warmup_steps=3, log_every=1,
                progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def snapshot(directory):
    """Bytes of every file under a directory (to prove that nothing was written)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def stop_at(step):
    def callback(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt

    return callback


# --- save / load ------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, data):
    tok = data[0]
    model = make_model(tok.vocab_size)
    io.save_run(tmp_path / "run", model, model.config, tok)
    assert io.is_run_dir(tmp_path / "run")
    loaded, tokenizer, cfg, _ = io.load_run(tmp_path / "run")
    assert cfg == model.config and not loaded.training
    ids = torch.tensor([tok.encode("Speak, speak.")])
    torch.testing.assert_close(loaded(ids), model.eval()(ids), rtol=0, atol=0)
    assert tokenizer.decode(tokenizer.encode(TEXT[:50])) == TEXT[:50]
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tied again after loading
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / io.WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118  (tied weights are stored once)
    payload = json.loads((tmp_path / "run" / io.CONFIG_FILE).read_text())
    assert payload["format"] == io.FORMAT and payload["format_version"] == 1  # a plain model: readable by v1


def test_foreign_and_corrupt_run_dirs(tmp_path, data):
    tok = data[0]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert not io.is_run_dir(hf) and not io.is_run_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a scratchlm run config"):
        io.load_run(hf)
    model = make_model(tok.vocab_size)
    run = io.save_run(tmp_path / "run", model, model.config, tok)
    weights = run / io.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        io.load_run(run)
    assert "\n" not in str(err.value)
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        io.load_run(run)
    (run / io.CONFIG_FILE).write_text("{ broken")
    with pytest.raises(CheckpointError, match="not JSON"):
        io.load_run(run)


def test_load_checks_shapes(tmp_path, data):
    tok = data[0]
    model = make_model(tok.vocab_size)
    run = io.save_run(tmp_path / "run", model, model.config, tok)
    payload = json.loads((run / io.CONFIG_FILE).read_text())
    payload["model"]["n_embd"] = 64
    (run / io.CONFIG_FILE).write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="shape"):
        io.load_run(run)


def test_writes_are_atomic(tmp_path, data, monkeypatch):
    tok = data[0]
    model = make_model(tok.vocab_size)
    run = io.save_run(tmp_path / "run", model, model.config, tok)
    before = snapshot(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]

    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")  # a crash part-way through the write
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        io.save_run(run, model, model.config, tok)
    assert snapshot(run)[Path(io.WEIGHTS_FILE)] == before[Path(io.WEIGHTS_FILE)]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]  # the temporary file is gone
    io.load_run(run)  # still loads: the old weights are intact


# --- resume -----------------------------------------------------------------------------------


def train(run_dir, data, cfg, *, resume=False, callbacks=(), seed=0, dropout=0.1):
    tok, train_set, val_set = data
    model = make_model(tok.vocab_size, seed=seed, dropout=dropout)
    trainer = Trainer(model, cfg, train_set, val_data=val_set, run_dir=run_dir, tokenizer=tok,
                      evaluator=LanguageModelEvaluator(tokenizer=tok, tokens_per_char=1.0, sample_tokens=0),
                      callbacks=callbacks)
    try:
        trainer.fit(resume=resume)
    except KeyboardInterrupt:
        pass
    return model, trainer


def test_resume_is_bit_identical(tmp_path, data):
    """6 steps, Ctrl-C, resume to 12 == 12 steps straight (dropout on, grad accumulation on)."""
    straight, _ = train(tmp_path / "a", data, config())
    _, first = train(tmp_path / "b", data, config(), callbacks=[stop_at(6)])
    assert first.step == 6
    info = json.loads((tmp_path / "b" / io.STATE_INFO_FILE).read_text())
    assert info["step"] == 6 and info["position"] == 6 * 8
    resumed, second = train(tmp_path / "b", data, config(), resume=True, seed=99)  # another init: overwritten
    assert second.step == 12
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    assert steps == [4, 8, 12]  # one line per evaluation, none repeated around the interruption


def test_keyboard_interrupt_writes_a_checkpoint(tmp_path, data):
    _, trainer = train(tmp_path / "run", data, config(max_steps=50, eval_every=0), callbacks=[stop_at(3)])
    assert trainer.step == 3
    assert json.loads((tmp_path / "run" / io.STATE_INFO_FILE).read_text())["step"] == 3
    model = io.load_run(tmp_path / "run").model
    for name, value in trainer.module.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_resume_with_another_config_changes_nothing(tmp_path, data):
    run = tmp_path / "run"
    train(run, data, config(), callbacks=[stop_at(4)])
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="lr differs") as err:
        train(run, data, config(lr=1e-2), resume=True)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="model config differs"):
        tok, train_set, val_set = data
        bigger = build_model(from_preset("tiny-gpt2", vocab_size=tok.vocab_size, context_length=16,
                                         n_layer=3))
        Trainer(bigger, config(), train_set, run_dir=run).fit(resume=True)
    assert snapshot(run) == before


def test_a_run_dir_with_the_older_config_keys_loads_and_resumes(tmp_path, data):
    """Run dirs saved before ModelConfig named its overrides *_override hold the plain names."""
    tok, train_set, val_set = data
    run = tmp_path / "run"

    def fit(resume, callbacks=()):
        model = make_model(tok.vocab_size, intermediate_size_override=48, n_kv_head_override=2)
        trainer = Trainer(model, config(), train_set, val_data=val_set, run_dir=run, tokenizer=tok,
                          callbacks=callbacks)
        try:
            trainer.fit(resume=resume)
        except KeyboardInterrupt:
            pass
        return trainer

    fit(False, [stop_at(4)])
    payload = json.loads((run / io.CONFIG_FILE).read_text())
    for key in ("n_kv_head", "head_dim", "intermediate_size"):
        payload["model"][key] = payload["model"].pop(key + "_override")
    (run / io.CONFIG_FILE).write_text(json.dumps(payload))
    loaded = io.load_run(run).config
    assert (loaded.intermediate_size, loaded.n_kv_head) == (48, 2)
    assert fit(True).step == 12


def test_resume_from_a_corrupt_checkpoint_changes_nothing(tmp_path, data):
    run = tmp_path / "run"
    train(run, data, config(), callbacks=[stop_at(4)])
    state = run / io.STATE_TENSORS_FILE
    state.write_bytes(state.read_bytes()[:-50])
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(run, data, config(), resume=True)
    assert snapshot(run) == before


def test_resume_detects_files_from_different_saves(tmp_path, data):
    run = tmp_path / "run"
    train(run, data, config(), callbacks=[stop_at(4)])
    info = json.loads((run / io.STATE_INFO_FILE).read_text())
    info["save_id"] = "0" * 32  # as if the process died between writing the weights and the state
    (run / io.STATE_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="different saves"):
        train(run, data, config(), resume=True)
