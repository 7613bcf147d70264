"""benchmarks/train_step.py: its --breakdown takes parts out of *our* model's step, so each ablation
must change what our model computes (else it would time nothing and report a part as free)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from conftest import REPO
from scratchlm.models import from_preset
from scratchlm.models.transformer import Transformer


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_step"] = module  # (its dataclass looks its module up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("part", ["attention core", "GELU", "norms"])
def test_each_ablation_changes_our_models_output(train_step, part):
    torch.manual_seed(0)
    model = Transformer(from_preset("tiny-gpt2")).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(ids)
        with train_step.ABLATIONS[part]():
            ablated = model(ids)
        again = model(ids)
    assert not torch.allclose(full, ablated)
    torch.testing.assert_close(again, full)  # the part is back after the step


def test_breakdown_reports_every_part(train_step, capsys):
    assert train_step.main(["--sizes", "demo", "--breakdown", "--steps", "1", "--warmup", "0",
                            "--malloc", "default"]) == 0
    out = capsys.readouterr().out
    for part in ("attention core", "GELU", "norms", "optimizer"):
        assert f"without {part}" in out
