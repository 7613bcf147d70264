"""Checkpoints of a training run and the checks before one is resumed.

A checkpoint is the run dir written by ``checkpoint.io.save_run`` plus the training state that
exact resumption needs: optimizer moments, every rank's RNG streams, the step, the item count,
the data position (epoch and offset into that epoch's seeded permutation) and the elapsed time.
``check_resumable`` compares a run dir with the trainer about to continue it and raises before
anything is written, so a mismatched resume never damages the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import io as ckpt
from scratchlm.errors import CheckpointError
from scratchlm.models.config import ModelConfig
from scratchlm.training.config import TrainConfig

FIX = "resume with the run's own settings, or start a new run with another --out"


def check_resumable(run_dir: Path, *, model_config: ModelConfig | None, training: Mapping[str, Any],
                    world_size: int, dataset_size: int) -> ckpt.TrainState:
    """Validate ``run_dir`` against the trainer's settings; nothing is written.  Returns its state.

    ``training``: the trainer's config as it would be saved (precision resolved).
    """
    where = f"cannot resume {run_dir}"
    payload = ckpt.read_run_config(run_dir)
    if model_config is not None:
        # Through run_model_config: a config.json of an older version (other key names) compares equal.
        saved, current = ckpt.run_model_config(payload).to_dict(), model_config.to_dict()
        saved.pop("name", None)
        current.pop("name", None)
        diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
        if diff:
            k = diff[0]
            raise CheckpointError(f"{where}: the model config differs "
                                  f"({k}: run has {saved.get(k)!r}, now {current.get(k)!r})", FIX)
    saved_training = payload.get("training") or {}
    for key in TrainConfig.TRAJECTORY:
        if key in saved_training and saved_training[key] != training[key]:
            raise CheckpointError(f"{where}: {key} differs "
                                  f"(run has {saved_training[key]!r}, now {training[key]!r})", FIX)
    state = ckpt.load_train_state(run_dir)
    info = state.info
    if info.get("world_size", 1) != world_size:
        raise CheckpointError(f"{where}: it ran on {info.get('world_size')} processes, now {world_size}",
                              "resume with the same number of processes")
    if info.get("dataset_size") != dataset_size:
        raise CheckpointError(f"{where}: the training data changed ({info.get('dataset_size')} "
                              f"examples in the run, {dataset_size} now)",
                              "resume with the run's own data and tokenizer")
    return state


def saved_precision(run_dir: Path) -> str | None:
    """The precision a run resolved ``"auto"`` to, so a resume keeps it."""
    precision = (ckpt.read_run_config(run_dir).get("training") or {}).get("precision")
    return precision if precision in ("fp32", "bf16") else None


def pack_state(optimizer: torch.optim.Optimizer, rng_states: list[torch.Tensor],
               info: dict[str, Any]) -> ckpt.TrainState:
    """The training state of a checkpoint: optimizer and RNG tensors, counters in ``info``."""
    rng_tensors, rng_info = ckpt.pack_rng(rng_states)
    return ckpt.TrainState(info={**info, "rng": rng_info},
                           tensors={**ckpt.pack_optimizer(optimizer), **rng_tensors})


def restore_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: Path,
                  state: ckpt.TrainState, rank: int) -> None:
    """Load weights, optimizer and this rank's RNG streams from a checked run dir.

    A run over a named base model saved only what it trains; the rest is the base's, which the
    caller loaded into ``module`` already.
    """
    manifest = ckpt.RunManifest.from_payload(ckpt.read_run_config(run_dir), str(run_dir))
    ckpt.load_weights_into(module, run_dir / ckpt.WEIGHTS_FILE, partial=manifest.base_model is not None)
    ckpt.unpack_optimizer(optimizer, state.tensors)
    ckpt.unpack_rng(state.tensors, state.info["rng"], rank)
