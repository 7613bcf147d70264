"""Shared fixtures: the ../shared folder (optional), and small helpers for CLI tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SCRATCHLM_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data folder beside the repo is optional)")
    return path


@pytest.fixture
def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe from ../shared/data/gpt2."""
    return shared_path("data", "gpt2", "encoder.json"), shared_path("data", "gpt2", "vocab.bpe")


@pytest.fixture
def smollm2_gguf() -> Path:
    return shared_path("models", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def fp32_activations(monkeypatch):
    """Packed weights multiply x as it is (``quant.linear.ACTIVATIONS``): their products are the
    dequantized weights' up to fp32 rounding, so a test of what a loader or converter put in the
    blocks can hold the logits to the float model's exactly."""
    from scratchlm.quant import linear

    monkeypatch.setattr(linear, "ACTIVATIONS", "fp32")


@pytest.fixture
def run_cli(capsys):
    """Run ``scratchlm ARGS...`` in-process; returns (exit_code, stdout, stderr)."""
    from scratchlm.cli import main

    def _run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test models are tiny: one thread is faster, and immune to OpenMP spinning on shared cores."""
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def ctrl_c_at(step: int):
    """Inside the block, every Trainer behaves as if Ctrl-C came right after update ``step``."""
    from scratchlm.training.trainer import Trainer

    original = Trainer.__init__

    def with_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)

        def interrupt(trainer):
            if trainer.step == step:
                raise KeyboardInterrupt

        self.callbacks.append(interrupt)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "__init__", with_interrupt)
        yield


def realistic_weights(model, seed: int = 0):
    """Re-draw every weight of a tiny model at the scale a trained one has, norms and biases included.

    transformers' default init (N(0, 0.02) matrices, norm weights 1, biases 0) leaves a tiny model's
    attention almost uniform and its logits almost flat, so a parity test on it cannot see a swapped
    q/k, a wrong rope base or two query heads exchanged: they move the logits by less than 1e-4.
    Here each matrix is N(0, 1/fan_in) (GPT-2's Conv1D stores ``[in, out]``, ``nn.Linear``
    ``[out, in]``), embeddings N(0, 0.5), norm weights 1 + N(0, 0.3) and biases N(0, 0.3): attention
    scores then have a standard deviation near 1 per head and logits spread over several nats,
    and two correct fp32 implementations agree to 2-5e-6 (float32 rounding of logits up to ~20).
    Works on transformers models and on ours alike (anything made of Linear/Embedding/1-d tensors).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)

    def normal(p, mean: float, std: float) -> None:
        p.copy_(torch.randn(p.shape, generator=generator) * std + mean)

    seen: set[int] = set()  # a tied head is the embedding: drawn once, as an embedding
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if isinstance(module, torch.nn.Embedding):
                    normal(p, 0.0, 0.5)
                elif p.dim() >= 2:
                    # transformers' Conv1D (GPT-2) multiplies x @ W with W [in, out]; Linear does x @ W.T
                    fan_in = p.shape[0] if type(module).__name__ == "Conv1D" else p.shape[1]
                    normal(p, 0.0, fan_in ** -0.5)
                elif name == "bias":
                    normal(p, 0.0, 0.3)
                else:  # a norm's weight (LayerNorm, RMSNorm, q/k-norm): around its default of 1
                    normal(p, 1.0, 0.3)
    return model.eval()


# Largest logit difference allowed between two fp32 implementations of the same model on
# realistic_weights: the real agreement is 2-5e-6 (GPT-2, Llama, Qwen2, Qwen3 against transformers),
# while a q/k swap, a rope base x100 or two query heads exchanged move them by 0.3 or more.
PARITY_ATOL = 1e-5


@pytest.fixture(autouse=True)
def absl_handler_off_captured_streams():
    """absl.logging (imported by rouge-score and lm-eval, the parity oracles of the eval tests) makes
    a handler on the sys.stderr of that moment, pytest's capture stream, and closes that stream
    when a later ``logging.config.dictConfig`` (uvicorn's, in the serving tests) shuts down every
    handler; pytest then crashes at exit.  Point it at the real stderr, which it never closes."""
    yield
    import sys

    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
