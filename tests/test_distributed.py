"""Data parallelism: 2 CPU processes (gloo) give the result of 1 process with the same global batch."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.multiprocessing as mp

from scratchlm.checkpoint.io import load_run, read_run_config
from scratchlm.data.windows import SlidingWindowDataset
from scratchlm.models import build_model, from_preset
from scratchlm.training import TrainConfig, Trainer, distributed

VOCAB, CONTEXT = 40, 16


def dataset() -> SlidingWindowDataset:
    ids = torch.randint(0, VOCAB, (1500,), generator=torch.Generator().manual_seed(0))
    return SlidingWindowDataset(ids, CONTEXT, 1)


def model():
    torch.manual_seed(1)
    return build_model(from_preset("tiny-gpt2", vocab_size=VOCAB, context_length=CONTEXT))


def config(batch_size: int, grad_accum: int) -> TrainConfig:
    return TrainConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=3, eval_every=3,
                       eval_batches=2, warmup_steps=1, lr=1e-2, progress=False, device="cpu")


def _worker(rank: int, world: int, init_file: str, run_dir: str, max_time: float | None = None) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init(rank, world, device="cpu", init_method=f"file://{init_file}")
    try:
        data = dataset()
        cfg = config(batch_size=2, grad_accum=2)
        if max_time is not None:
            cfg = cfg.replace(max_steps=None, max_time=max_time, eval_every=0)
        Trainer(model(), cfg, data, val_data=data, run_dir=run_dir, dist=ctx).fit()
    finally:
        distributed.shutdown(ctx)


def spawn(*args, timeout: float = 120.0) -> None:
    """Run 2 workers; fail (instead of hanging) if they do not finish in time."""
    context = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the data-parallel workers did not finish (ranks out of step?)")


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    run_dir = tmp_path / "ddp"
    spawn(2, str(tmp_path / "init"), str(run_dir))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = dataset()
        single = model()
        trainer = Trainer(single, config(batch_size=8, grad_accum=1), data, val_data=data)
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    ddp_model = load_run(run_dir).model  # written by rank 0 alone
    initial = model().state_dict()
    for name, value in single.state_dict().items():
        # Float summation order differs (two partial sums + all-reduce); Adam divides by the gradient's
        # own size, so near-zero gradients turn that rounding into ~1e-5 of weight.  A wrong split of
        # the data would differ by the size of the updates themselves (~1e-2 here).
        moved = (value - initial[name]).abs().max()
        torch.testing.assert_close(ddp_model.state_dict()[name], value, rtol=0, atol=max(1e-4, 0.01 * moved))
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["tokens"] == result.tokens == 3 * 8 * CONTEXT
    assert evals[0]["val_loss"] == pytest.approx(result.last_eval["val_loss"], rel=1e-4)
    assert read_run_config(run_dir)["training"]["batch_size"] == 2


@pytest.mark.slow
def test_a_time_budget_stops_every_rank_after_the_same_step(tmp_path):
    """Each rank has its own clock; they agree on one at every step, so none waits for a missing peer."""
    run_dir = tmp_path / "ddp"
    spawn(2, str(tmp_path / "init"), str(run_dir), 1.5)
    info = json.loads((run_dir / "train_state.json").read_text())
    assert info["step"] >= 1 and info["world_size"] == 2
