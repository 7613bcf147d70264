"""Real interruptions: SIGINT sent to a running ``scratchlm pretrain`` (one process, and two under
``torchrun`` with gloo and ``env://``) mid-run, then ``--resume``: the result equals, bit for bit,
the run that was never interrupted — weights, and every logged loss, learning rate and gradient norm.
Dropout is on, so each rank's random stream must be saved and restored with the rest.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import scratchlm

TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n") * 15
RUN = ["--preset", "tiny-gpt2", "--context-length", "16", "--batch-size", "2", "--dropout", "0.1",
       "--eval-every", "25", "--eval-batches", "1", "--log-every", "1", "--sample-tokens", "0",
       "--precision", "fp32", "--threads", "1"]
# Fields that measure the clock, not the trajectory.
CLOCK = {"elapsed", "tokens_per_s"}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def env() -> dict[str, str]:
    """The environment of a child process: this scratchlm on its path, one thread."""
    src = str(Path(scratchlm.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def assert_same_weights(run: Path, ref: Path) -> None:
    """Every tensor of model.safetensors equal (the header differs: each save has its own id)."""
    ours, theirs = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in CLOCK} for line in lines]


def logged_step(run: Path) -> int:
    """The last step in metrics.jsonl so far (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)
    except FileNotFoundError:
        return 0


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _main_in_child(args: list[str], environ: dict[str, str]) -> None:
    os.environ.update(environ)
    code = 1
    try:
        from scratchlm.cli import main

        code = main(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not pytest's exit handlers: this is a forked copy of the test process


def fork_cli(args: list[str], environ: dict[str, str] | None = None) -> multiprocessing.Process:
    """``scratchlm ARGS`` in a forked child: a real process (its own signals, its own process
    group member for torch.distributed) without the seconds a fresh interpreter spends importing torch."""
    child = multiprocessing.get_context("fork").Process(target=_main_in_child,
                                                        args=([str(a) for a in args], environ or {}))
    child.start()
    return child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel(args: list[str], timeout: float = 120.0) -> None:
    """Two ranks of ``scratchlm ARGS`` with the environment torchrun gives them (env://, gloo)."""
    port = free_port()
    ranks = [fork_cli(args, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in range(2)]
    for rank in ranks:
        rank.join(timeout)
    if any(rank.exitcode is None for rank in ranks):
        for rank in ranks:
            rank.kill()
        pytest.fail("the data-parallel ranks did not finish (out of step?)")
    assert [rank.exitcode for rank in ranks] == [0, 0]


def wait_for_step(run: Path, step: int, alive, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run) < step:
        if not alive() or time.monotonic() > deadline:
            pytest.fail(f"the run ended or stalled before step {step}")
        time.sleep(0.005)


def saved_step(run: Path, after_step: int, max_steps: int) -> int:
    """The step the interrupted run saved: strictly inside the run, at or after the interruption."""
    saved = json.loads((run / "train_state.json").read_text())["step"]
    assert after_step <= saved < max_steps
    return saved


def test_sigint_mid_run_then_resume_equals_the_uninterrupted_run(run_cli, tmp_path, corpus):
    steps = 150
    common = ["pretrain", *RUN, "--data", corpus, "--max-steps", steps]
    code, _, err = run_cli(*common, "--out", tmp_path / "ref")
    assert code == 0, err

    run = tmp_path / "run"
    child = fork_cli([*common, "--out", run])
    wait_for_step(run, 5, child.is_alive)
    os.kill(child.pid, signal.SIGINT)  # what Ctrl-C sends
    child.join(60)
    assert child.exitcode == 130  # saved, and said how to continue
    saved = saved_step(run, 5, steps)
    code, _, err = run_cli("pretrain", "--resume", run)  # the run's own budget: --max-steps 150
    assert code == 0, err
    assert json.loads((run / "train_state.json").read_text())["step"] == steps
    assert_same_weights(run, tmp_path / "ref")
    assert records(run) == records(tmp_path / "ref"), f"resumed at step {saved}"


@pytest.mark.slow
def test_torchrun_two_processes_with_dropout_interrupted_and_resumed_bit_for_bit(tmp_path, corpus):
    """The README's data-parallel path: torchrun (env:// rendezvous), gloo on CPU, two ranks; SIGINT
    to both workers mid-run.  The uninterrupted reference and the resume run the same two ranks
    with torchrun's environment in forked processes (a torchrun start costs three fresh
    interpreters)."""
    steps = 120
    common = ["pretrain", *RUN, "--data", str(corpus), "--max-steps", str(steps)]
    ref = tmp_path / "ref"
    data_parallel([*common, "--out", ref])
    state = json.loads((ref / "train_state.json").read_text())
    assert (state["world_size"], state["step"]) == (2, steps)
    assert json.loads((ref / "config.json").read_text())["training"]["batch_size"] == 2  # per process

    run = tmp_path / "run"
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "scratchlm", *common, "--out", str(run)],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run, 5, lambda: torchrun.poll() is None)
        workers = children(torchrun.pid)
        assert len(workers) == 2
        for pid in workers:  # Ctrl-C reaches every worker (torchrun itself would tear them down)
            os.kill(pid, signal.SIGINT)
        output = torchrun.communicate(timeout=120)[0]
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    assert torchrun.returncode != 0 and "--resume" in output, output  # the workers exited 130
    saved = saved_step(run, 5, steps)
    assert json.loads((run / "train_state.json").read_text())["world_size"] == 2

    data_parallel(["pretrain", "--resume", run])
    assert json.loads((run / "train_state.json").read_text())["step"] == steps
    assert_same_weights(run, ref)
    assert records(run) == records(ref), f"resumed at step {saved}"
