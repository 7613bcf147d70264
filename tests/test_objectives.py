"""The loop's contracts for every objective: LossOutput metrics, evaluators, explicit parameter groups,
the run-dir manifest over a named base model, and the one options path to a TrainConfig."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from scratchlm.checkpoint import io
from scratchlm.cli.training_options import add_training_options, given_options, train_config
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.models import build_model, from_preset
from scratchlm.training import LossEvaluator, Totals, TrainConfig, Trainer
from scratchlm.training.logging import read_metrics
from scratchlm.training.losses import classification_loss


def toy_classification(n=64, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return list(zip(x, y, strict=True))


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "warmup_steps": 0, "log_every": 1, "device": "cpu",
                          "precision": "fp32", **kw})


def test_metrics_are_summed_like_the_loss_and_reported_as_means(tmp_path):
    """A classifier over the loop: accuracy is a metric sum, its mean per example is logged and plotted;
    accumulating micro-batches gives the same step as one batch."""
    data = toy_classification()
    runs = {}
    for batch, accum in ((16, 1), (4, 4)):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 2)
        run = tmp_path / f"run{batch}"
        evaluator = LossEvaluator(unit="examples", plot_metrics=("val_accuracy",), shown=("accuracy",))
        config = quiet(batch_size=batch, grad_accum=accum, max_steps=6, lr=0.05, eval_every=3)
        trainer = Trainer(model, config, data, val_data=data[:32], loss_fn=classification_loss,
                          evaluator=evaluator, run_dir=run, model_config=from_preset("tiny-gpt2"))
        result = trainer.fit()
        runs[batch] = model.weight.detach().clone()
        records = read_metrics(run / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        assert all(0 <= r["accuracy"] <= 1 and "examples_per_s" in r for r in train)
        assert result.tokens == 6 * 16  # the loss counted examples
        final = result.last_eval
        direct = sum(int(model(x[None]).argmax() == y) for x, y in data[:32]) / 32
        assert final["val_accuracy"] == pytest.approx(direct)
        assert (run / "loss.png").exists()
    torch.testing.assert_close(runs[16], runs[4], rtol=1e-5, atol=1e-6)


def test_totals_and_loss_evaluator_figures():
    totals = Totals(loss_sum=6.0, count=3.0, metrics={"accuracy": 2.0, "rewards/margins": 1.5})
    figures = LossEvaluator().figures("val", totals)
    assert figures == {"val_loss": 2.0, "val_accuracy": pytest.approx(2 / 3), "val_rewards/margins": 0.5}
    assert LossEvaluator().figures("val", None) == {"val_loss": None}


def test_explicit_parameter_groups_set_their_own_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    groups = [{"params": list(model[1].parameters()), "weight_decay": 0.0}]
    trainer = Trainer(model, quiet(batch_size=4, max_steps=1, weight_decay=0.1), toy_classification(8, 4),
                      loss_fn=classification_loss, parameters=groups)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.0]
    assert {id(p) for p in trainer.params} == {id(p) for p in model[1].parameters()}
    before = model[0].weight.clone()
    trainer.fit()
    assert torch.equal(model[0].weight, before)


def test_a_run_over_a_named_base_saves_only_what_it_trained(tmp_path):
    config = from_preset("tiny-gpt2", vocab_size=32, context_length=8)
    torch.manual_seed(0)
    base = build_model(config)
    io.save_run(tmp_path / "base", base, config)
    torch.manual_seed(1)
    tuned = build_model(config)
    tuned.load_state_dict(base.state_dict())
    tuned.requires_grad_(False)
    last = tuned.layers[-1]
    last.requires_grad_(True)
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.1)
    io.save_run(tmp_path / "tuned", tuned, config, manifest=io.RunManifest(base_model="../base"))
    payload = json.loads((tmp_path / "tuned" / io.CONFIG_FILE).read_text())
    assert payload["format_version"] == 2 and payload["base_model"] == "../base"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tuned" / io.WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    assert names == {f"layers.{config.n_layer - 1}.{n}" for n, _ in last.named_parameters()}
    loaded = io.load_run(tmp_path / "tuned")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded.model(ids), tuned(ids))
    assert loaded.manifest.base_model == "../base"
    (tmp_path / "base" / io.WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError):
        io.load_run(tmp_path / "tuned")


def test_a_manifest_of_the_wrong_type_is_a_checkpoint_error(tmp_path):
    config = from_preset("tiny-gpt2", vocab_size=32, context_length=8)
    io.save_run(tmp_path / "run", build_model(config), config)
    path = tmp_path / "run" / io.CONFIG_FILE
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "head": ["not", "a", "dict"]}))
    with pytest.raises(CheckpointError, match="'head' must be a dict"):
        io.load_run(tmp_path / "run")


def options(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_training_options(parser, TrainConfig(max_epochs=5, lr=5e-5, batch_size=8), sources={"lr": "the book"})
    assert "the book" in parser.format_help()
    return given_options(parser.parse_args(list(argv)))


def test_training_options_over_a_recipe_and_over_a_saved_run():
    recipe = TrainConfig(max_epochs=5, lr=5e-5, batch_size=8)
    assert train_config(options(), recipe) == recipe
    tc = train_config(options("--lr", "1e-4", "--grad-clip", "0", "--max-steps", "7"), recipe)
    assert (tc.lr, tc.grad_clip, tc.max_steps, tc.max_epochs) == (1e-4, None, 7, None)  # a budget replaces
    saved = {**recipe.to_dict(), "precision": "fp32", "sample_tokens": 20}  # old keys are ignored
    resumed = train_config(options("--epochs", "8", "--eval-every", "epoch"), recipe, saved=saved)
    assert (resumed.max_epochs, resumed.eval_every, resumed.precision) == (8, "epoch", "fp32")
    with pytest.raises(ConfigError, match="--lr 0.1 differs"):
        train_config(options("--lr", "0.1"), recipe, saved=saved)
    with pytest.raises(ConfigError, match="batch_size"):
        train_config(options("--batch-size", "0"), recipe)


def test_the_gradient_norm_runs_over_the_parameters_in_the_models_order():
    """Float sums depend on order: the clipped norm (and so every update) must not depend on how
    the optimizer groups the parameters (the demo is bit-identical across that refactor)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    trainer = Trainer(model, quiet(batch_size=4, max_steps=1), toy_classification(8, 4),
                      loss_fn=classification_loss)
    assert [id(p) for p in trainer.params] == [id(p) for p in model.parameters()]
    with pytest.raises(ConfigError, match="not the model's"):
        Trainer(model, quiet(batch_size=4, max_steps=1), toy_classification(8, 4),
                loss_fn=classification_loss, parameters=[torch.nn.Parameter(torch.zeros(2))])
