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
