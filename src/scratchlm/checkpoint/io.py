"""Run directories: what ``scratchlm pretrain`` writes and ``scratchlm.load`` opens.

A run dir holds::

    config.json              format marker + version, model config, training and data settings,
                             and the manifest: a base model, task head, adapter, chat template
    model.safetensors        the weights (float32 master copy; tied weights stored once) — or, when
                             the manifest names a base model, only the tensors the run trained
    adapter/                 a PEFT-format adapter (adapter_config.json + adapter_model.safetensors)
    tokenizer/               tokenizer.save(...)
    train_state.safetensors  optimizer state tensors and RNG states (uint8 tensors)
    train_state.json         step, tokens, data position, schedule, elapsed time, Python/NumPy RNG
    metrics.jsonl, loss.png, samples.txt   (written by the training loop)

Only safetensors and JSON: nothing is pickled, so opening a run dir never runs code.

Every file is written atomically (``checkpoint.atomic``, re-exported here): a crash or Ctrl-C
mid-save leaves either the old file or the new one, never half of one.  A save touches several
files, so each of the three weight/state files carries the same random ``save_id``; a resume
checks that they agree, which catches a crash *between* two renames (new weights beside an old
optimizer state).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from scratchlm.checkpoint.atomic import TMP_PREFIX, atomic_dir, atomic_path, write_json_atomic
from scratchlm.errors import CheckpointError, UserError
from scratchlm.models.config import ModelConfig

FORMAT = "scratchlm-run"
FORMAT_VERSION = 2  # 2: the manifest (base_model, head, adapter, chat_template); 1: a model alone
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_INFO_FILE = "train_state.json"
ADAPTER_DIR = "adapter"


# ---------------------------------------------------------------------------------------------
# Atomic writes (checkpoint/atomic.py; re-exported here, where the run dir is written)
# ---------------------------------------------------------------------------------------------


def save_tensors_atomic(path: str | Path, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def unique_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state without repeats, and ``{alias: stored name}`` for tied parameters.

    safetensors refuses tensors that share memory; a tied LM head is stored once, under the
    token embedding's name, and re-tied by the model class on load.
    """
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen and tensor.numel() > 0:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            state[name] = tensor
    return state, aliases


def load_weights_into(model: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Copy the tensors of ``path`` into ``model`` in place; every parameter must be there, in its shape.

    ``partial``: the file holds only some of the model's tensors (a run over a named base model);
    each must still belong to the model, in its shape.

    A model with a ``load_tensors`` method (the n-gram: its count tables' sizes come from the
    training text, not the config) is handed the tensors to rebuild itself from instead.
    """
    if hasattr(model, "load_tensors"):
        model.load_tensors(_read_tensors(path, "model weights")[0])
        return
    tensors = _read_tensors(path, "model weights", device=next(model.parameters()).device)[0]
    expected, aliases = unique_state(model)
    missing = [] if partial else sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - set(aliases))
    if missing or unexpected:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise CheckpointError(f"{path} does not fit the model ({detail})",
                              "the weights were written for another model config; check config.json")
    expected = {name: value for name, value in expected.items() if name in tensors}
    for name, value in expected.items():
        if tensors[name].shape != value.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the model expects {tuple(value.shape)}",
                "the weights were written for another model config; check config.json")
    with torch.no_grad():
        for name, value in expected.items():
            value.copy_(tensors[name])


def _read_tensors(path: Path, what: str,
                  device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; any damage is a one-line CheckpointError."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{what} missing: {path}", "the run dir is incomplete; pick another run")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types (and OSError) for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what} at {path} is corrupt or not a safetensors file ({reason})",
                              "restore the file or start a new run") from None
    return tensors, metadata


def _read_metadata(path: Path, what: str) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{what} missing: {path}", "the run dir is incomplete; pick another run")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # damaged header
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what} at {path} is corrupt or not a safetensors file ({reason})",
                              "restore the file or start a new run") from None


# ---------------------------------------------------------------------------------------------
# Training state (optimizer, RNG, counters)
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything besides the weights that exact resumption needs.

    ``info`` is JSON (step, tokens, data position, schedule, elapsed, Python/NumPy RNG);
    ``tensors`` are the optimizer state and the torch RNG states.
    """

    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def pack_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state as ``optimizer.<param index>.<key>`` tensors.

    The hyperparameters of the parameter groups are not stored: the optimizer is rebuilt from the
    (checked) training config, and the schedule sets the learning rate before every step.
    """
    tensors = {}
    for index, values in optimizer.state_dict()["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"optimizer.{index}.{key}"] = value
    return tensors


def unpack_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    current = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in current["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    if state and max(state) >= n_params:
        raise CheckpointError(f"the optimizer state covers {max(state) + 1} parameters, "
                              f"the model has {n_params}",
                              "the checkpoint was written for another set of trainable parameters")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def pack_rng(rank_states: list[torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch (CPU, CUDA), Python and NumPy random states: tensors + JSON.

    ``rank_states``: the CPU torch states of every data-parallel rank, gathered by the caller;
    each rank resumes its own stream (dropout masks differ between ranks).
    """
    import numpy as np

    tensors: dict[str, torch.Tensor] = {}
    for rank, state in enumerate(rank_states or [torch.get_rng_state()]):
        tensors[f"rng.torch.rank{rank}"] = state
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    info = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, info


def unpack_rng(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any], rank: int = 0) -> None:
    import numpy as np

    key = f"rng.torch.rank{rank}"
    if key not in tensors:
        raise CheckpointError(f"the checkpoint has no random state for rank {rank}",
                              "resume with the same number of processes as the run was started with")
    torch.set_rng_state(tensors[key].to(torch.uint8).cpu())
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu() for t in cuda])
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# The run dir
# ---------------------------------------------------------------------------------------------


@dataclass
class RunManifest:
    """What a run dir holds besides a plain model; each entry is a top-level key of ``config.json``.

    ``base_model``: a reference ``scratchlm.load`` opens (run dir, Hugging Face directory or hub
    id, .gguf file).  When set, the run does not copy the base's weights: ``model.safetensors``
    holds only the tensors the run changed (a trained last block, a task head), loaded over the
    base's.  ``head``: the task head on the model (``{"type": "classification", "labels": [...],
    ...}``), rebuilt by ``scratchlm.finetune.heads.attach_head``.  ``adapter``: the adapter beside
    the weights (``{"format": "peft", "path": "adapter"}``), loaded by ``scratchlm.finetune.lora``.
    ``chat_template``: the Jinja template the run was trained with, used by chat and the server.
    A run dir with none of them is format version 1, which older scratchlm versions read.
    """

    base_model: str | None = None
    head: dict[str, Any] | None = None
    adapter: dict[str, Any] | None = None
    chat_template: str | None = None

    KEYS = ("base_model", "head", "adapter", "chat_template")

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.KEYS if getattr(self, key) is not None}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], where: str) -> RunManifest:
        manifest = cls(**{key: payload.get(key) for key in cls.KEYS})
        for key, kind in (("base_model", str), ("head", dict), ("adapter", dict), ("chat_template", str)):
            value = getattr(manifest, key)
            if value is not None and not isinstance(value, kind):
                raise CheckpointError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}",
                                      "restore config.json")
        if manifest.head is not None and not isinstance(manifest.head.get("type"), str):
            raise CheckpointError(f"{where}: the head has no type", "restore config.json")
        return manifest


def save_run(run_dir: str | Path, model: torch.nn.Module, config: ModelConfig, tokenizer: Any = None,
             train_state: TrainState | None = None, *, training: Mapping[str, Any] | None = None,
             data: Mapping[str, Any] | None = None, evaluation: Mapping[str, Any] | None = None,
             manifest: RunManifest | None = None) -> Path:
    """Write (or update) a run dir; every file atomically.

    ``config``: the model's ``ModelConfig``.  ``tokenizer``: anything with ``save(directory)``, or
    None.  ``train_state``: optimizer/RNG/counters for ``--resume`` (None for a weights-only export,
    which also removes any older training state so that it cannot be resumed out of step).
    ``training`` / ``data`` / ``evaluation``: the settings that produced the run, stored in
    ``config.json``.  ``manifest``: what sits on or beside the model (``RunManifest``); with a
    ``base_model``, ``model.safetensors`` holds only the tensors the run trained.  A model with a
    task head keeps its language model as ``model.base`` (``finetune.heads``); the adapters of a
    manifest that lists them are also written as a PEFT directory.
    """
    from scratchlm import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper
    save_id = uuid.uuid4().hex
    if tokenizer is not None:
        with atomic_dir(run_dir / TOKENIZER_DIR) as tmp:  # the tokenizer of a run never changes between saves
            tokenizer.save(tmp)
    manifest = manifest or RunManifest()
    state, _ = unique_state(model)
    if manifest.base_model is not None:  # only what the run trained; the rest is the base's
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {name: tensor for name, tensor in state.items() if name in trained}
    save_tensors_atomic(run_dir / WEIGHTS_FILE, state, {"format": "pt", "scratchlm_save_id": save_id})
    if manifest.adapter is not None:  # the adapters also as a PEFT directory, for peft and other tools
        from scratchlm.finetune.lora import save_adapter

        save_adapter(getattr(model, "base", model), run_dir / manifest.adapter.get("path", ADAPTER_DIR),
                     manifest.base_model, metadata={"scratchlm_save_id": save_id})
    if train_state is not None:
        save_tensors_atomic(run_dir / STATE_TENSORS_FILE, train_state.tensors, {"scratchlm_save_id": save_id})
        write_json_atomic(run_dir / STATE_INFO_FILE, {**train_state.info, "save_id": save_id})
    else:
        for name in (STATE_TENSORS_FILE, STATE_INFO_FILE):
            (run_dir / name).unlink(missing_ok=True)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if manifest.to_dict() else 1,
        "scratchlm_version": __version__,
        "architecture": getattr(config, "arch", "transformer"),
        "model": config.to_dict(),
        **manifest.to_dict(),
    }
    for key, section in (("training", training), ("data", data), ("evaluation", evaluation)):
        if section is not None:
            payload[key] = dict(section)
    write_json_atomic(run_dir / CONFIG_FILE, payload)
    return run_dir


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose ``config.json`` carries the scratchlm run marker."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        payload = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a run dir, checked for the format marker and version."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"run dir not found: {run_dir}", "check the path")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {CONFIG_FILE}, so it is not a scratchlm run dir",
                              "pass a directory written by 'scratchlm pretrain'")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable or not JSON ({err})".replace("\n", " "),
                              "restore the file or start a new run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a scratchlm run config (no \"format\": \"{FORMAT}\")",
                              "for a Hugging Face directory use scratchlm.load, which detects it")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has run format version {version!r}; "
                              f"this scratchlm reads up to {FORMAT_VERSION}",
                              "upgrade scratchlm")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"{path} has no model config", "restore the file or start a new run")
    return payload


def run_model_config(payload: Mapping[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(dict(payload["model"]))
    except UserError as err:
        raise CheckpointError(f"the run's model config is invalid: {err.what}", err.fix or "") from None
    except TypeError as err:
        raise CheckpointError(f"the run's model config is invalid ({err})", "restore config.json") from None


class LoadedRun(NamedTuple):
    model: torch.nn.Module
    tokenizer: Any
    config: ModelConfig
    manifest: RunManifest


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> LoadedRun:
    """``(model, tokenizer, config, manifest)`` of a run dir; the model is in eval mode on ``device``.

    A run that names a base model loads the base first (``scratchlm.load``), then its own
    tensors over it; a head and an adapter in the manifest are attached.  The tokenizer is None
    when the run dir (and its base) has none.  A missing, damaged or foreign file is a one-line
    ``CheckpointError``.
    """
    from scratchlm.models import build_empty_model

    run_dir = Path(run_dir)
    payload = read_run_config(run_dir)
    config = run_model_config(payload)
    manifest = RunManifest.from_payload(payload, str(run_dir / CONFIG_FILE))
    tokenizer = None
    if manifest.base_model is not None:
        from scratchlm.api import load

        base = load(_resolve_base(run_dir, manifest.base_model), device=device, dtype=dtype)
        model, tokenizer = base.model, base.tokenizer
        if base.config.to_dict() | {"name": None} != config.to_dict() | {"name": None}:
            raise CheckpointError(f"{run_dir}: its base model {manifest.base_model} has another config "
                                  "than the run was trained on", "restore the base model the run names")
    else:
        model = build_empty_model(config, device=device)
    if manifest.adapter is not None:
        from scratchlm.finetune.lora import load_adapter

        load_adapter(model, run_dir / manifest.adapter.get("path", ADAPTER_DIR), base=manifest.base_model)
    if manifest.head is not None:
        from scratchlm.finetune.heads import attach_head

        model = attach_head(model, manifest.head)
    load_weights_into(model, run_dir / WEIGHTS_FILE, partial=manifest.base_model is not None)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if (run_dir / TOKENIZER_DIR).is_dir():
        from scratchlm.tokenizers import load as load_tokenizer

        try:
            tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
        except UserError as err:
            raise CheckpointError(f"the run's tokenizer cannot be loaded: {err.what}",
                                  "restore the tokenizer/ folder") from None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens, "
                              f"the model only {config.vocab_size}",
                              "the tokenizer/ folder belongs to another run")
    return LoadedRun(model, tokenizer, config, manifest)


def _resolve_base(run_dir: Path, ref: str) -> str:
    """A base named by a relative path is relative to the run dir (so the pair can move together)."""
    candidate = run_dir / ref
    return str(candidate) if not Path(ref).is_absolute() and candidate.exists() else ref


def load_train_state(run_dir: str | Path) -> TrainState:
    """The training state of a run dir, checked to come from the same save as its weights."""
    run_dir = Path(run_dir)
    info_path = run_dir / STATE_INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{run_dir} has no training state ({STATE_INFO_FILE})",
                              "it was exported without one; start a new run from its weights instead")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{info_path} is unreadable or not JSON",
                              "restore the file or start a new run") from None
    tensors, meta = _read_tensors(run_dir / STATE_TENSORS_FILE, "training state")
    weights_meta = _read_metadata(run_dir / WEIGHTS_FILE, "model weights")
    ids = {info.get("save_id"), meta.get("scratchlm_save_id"), weights_meta.get("scratchlm_save_id")}
    if len(ids) != 1 or None in ids:
        raise CheckpointError(f"the weights and training state in {run_dir} come from different saves "
                              "(a save was interrupted between files)",
                              "start a new run, or restore the files")
    for key in ("step", "tokens", "epoch", "position", "elapsed"):
        value = info.get(key)
        if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            raise CheckpointError(f"{info_path} lacks a valid {key!r}", "restore the file or start a new run")
    return TrainState(info=info, tensors=tensors)


def clean_temporaries(run_dir: str | Path) -> None:
    """Remove temporary files an interrupted save left behind (they are never read)."""
    for path in Path(run_dir).glob(TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
