"""THE training loop: a dataset, a loss function and a set of trainable parameters.

Pretraining is one caller (``scratchlm.cli.pretrain``); finetuning (classification, instruction
tuning, LoRA, DPO) is another dataset, another loss and another parameter set over this same loop,
so everything a run needs lives here once:

* AdamW with weight decay on matrices only (embeddings and linear weights; biases and norm
  scales are not decayed: shrinking them towards zero has no regularising meaning);
* linear warmup, then cosine decay to ``min_lr`` over the budget (``schedule.py``);
* gradient clipping and gradient accumulation (exact: losses are sums divided by the global
  token count once per step, see ``losses.py``);
* bf16 autocast (float32 master weights and optimizer state) where the device does bf16 fast;
* evaluation every ``eval_every`` steps (or at the end of every epoch) on fixed windows of both
  splits, or on all of them (train and validation loss, perplexity, validation nats per
  character) with a text sample, optionally once before the first update too;
* budgets in steps, epochs, tokens or wall-clock seconds, whichever comes first;
* the run dir (``checkpoint.io``): checkpoints every ``save_every`` steps and at the end,
  a last one on Ctrl-C, and exact resumption (weights, optimizer, schedule, RNG, data position);
* data parallelism through ``torchrun`` (``distributed.py``).

The data order is a seeded permutation per epoch, recomputed from ``(seed, epoch)``, so the
checkpoint only records the epoch and how far into it the run is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scratchlm.checkpoint import io as ckpt
from scratchlm.errors import CheckpointError, ConfigError, DataError
from scratchlm.training import distributed
from scratchlm.training.logging import (
    METRICS_FILE,
    PLOT_FILE,
    SAMPLES_FILE,
    MetricsLog,
    Progress,
    append_sample,
    fsync_append,
    plot_losses,
    read_metrics,
)
from scratchlm.training.losses import LossFn, next_token_loss
from scratchlm.training.schedule import Budget, WarmupCosine

PRECISIONS = ("fp32", "bf16", "auto")
# "auto" on a CPU with bf16 matmuls: smaller models train in fp32 without timing both (see
# Trainer._probe_precision).  The 0.79M demo model gained nothing from bf16, gpt2-124m 1.7x.
PROBE_MIN_PARAMETERS = 5_000_000


@dataclass
class TrainConfig:
    """How to train; saved in the run dir's ``config.json`` under ``"training"``.

    ``batch_size`` is per process and per micro-batch: a step sees
    ``batch_size × grad_accum × world_size`` examples.
    """

    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    # Budgets: training stops at the first one reached (at least one must be set).
    max_steps: int | None = None
    max_epochs: float | None = None
    max_tokens: int | None = None
    max_time: float | None = None  # seconds, evaluation and checkpoints included
    eval_every: int | str | None = 250  # steps, or "epoch"; None or 0: evaluate only at the end
    eval_batches: int = 8  # global batches of each split per evaluation (fixed windows); 0: every window
    eval_at_start: bool = False  # also evaluate the untrained model (step 0) of a new run
    save_every: int | None = None  # steps; None or 0: save only at the end (and on Ctrl-C)
    log_every: int = 10  # steps between "train" lines in metrics.jsonl
    sample_prompt: str = "\n"
    sample_tokens: int = 200  # 0: no samples
    sample_temperature: float = 0.8
    seed: int = 1337
    precision: str = "auto"  # "fp32", "bf16" (autocast, fp32 master weights) or "auto"
    device: str = "auto"
    progress: bool = True  # the tqdm bar and status lines on stderr

    # Fields that shape the trajectory: a resumed run must have the same values.  The budgets,
    # evaluation, saving and display settings may change (a longer budget extends a run).
    TRAJECTORY = ("batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
                  "beta2", "eps", "grad_clip", "seed", "precision")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("batch_size", "grad_accum", "log_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}",
                                  f"pass a positive {key}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise ConfigError(f"eval_batches must be a non-negative integer, got {self.eval_batches!r}",
                              "pass 0 to evaluate on every window")
        for key in ("eval_every", "save_every"):
            value = getattr(self, key)
            if key == "eval_every" and value == "epoch":
                continue
            if value is not None and (not isinstance(value, int) or value < 0):
                what = " or 'epoch'" if key == "eval_every" else ""
                raise ConfigError(f"{key} must be a non-negative integer{what}, got {value!r}",
                                  "pass 0 to turn it off")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip}",
                              "pass None to turn clipping off")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}", "pass 0 for none")
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens must be >= 0, got {self.sample_tokens}",
                              "pass 0 for no samples")
        self.budget()
        self.schedule()

    def budget(self) -> Budget:
        return Budget(self.max_steps, self.max_epochs, self.max_tokens, self.max_time)

    def schedule(self) -> WarmupCosine:
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        return WarmupCosine(self.lr, min_lr, self.warmup_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(unknown)}",
                              "the run was written by another version of scratchlm")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    step: int
    tokens: int
    elapsed: float
    last_eval: dict[str, Any] | None
    sample: str | None
    run_dir: Path | None


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are faster than float32 here.

    CUDA: Ampere or newer.  CPU: with AMX tiles (Sapphire Rapids and later; a bf16 matmul ran
    4.7× faster than float32) or with AVX512-BF16 (Zen 4, Cooper Lake and later; a 1024² bf16
    matmul ran 391 GFLOP/s against 138 for float32 on a Zen 4 EPYC, 2.8×).  Without either
    (AVX2, plain AVX-512) PyTorch's bf16 matmul falls back to slow paths (over 10× slower than
    float32 on an AVX2 EPYC).  Whether a given model gains is another matter (small products
    gain little and autocast adds casts): ``Trainer`` times both on CPUs before choosing.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(check and check()) for check in (getattr(torch.cpu, n, None) for n in names))
    return False


_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc serves every allocation over 32 MB with its own ``mmap`` and unmaps it when
    freed, so the next one starts on fresh pages and faults every 4 KB page in (zeroed by the
    kernel) again.  A GPT-2 step allocates and frees several such tensors (logits, the embedding's
    gradient, bf16 copies of the tied matrix): at gpt2-124m (context 256, batch 2) on a 2-core
    Zen 4, 150k-190k page faults a step, and the fp32 step took 2.8-3.0 s against 2.45 s without
    them, the bf16 one 1.5-1.7 s against 1.4 s.  Served from the heap instead, with the trim
    threshold raised, freed blocks are reused on the next step; the cost is that the process
    keeps its peak memory until it exits.  Process-wide; called by
    ``Trainer`` on the CPU.  Returns whether it applied (Linux with glibc only).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    _MALLOC_TUNED = bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))
    return _MALLOC_TUNED


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"``: bf16 where the hardware multiplies bf16 fast, else fp32 (``Trainer`` then probes CPUs)."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def _timed_backward(model: torch.nn.Module, loss_fn: LossFn, batch: Any, bf16: bool,
                    device: torch.device) -> float:
    t0 = time.perf_counter()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = loss_fn(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def param_groups(parameters: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices (≥ 2 dims: embeddings, linear weights) decay; vectors do not."""
    params = [p for p in parameters if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def stack_collate(items: Sequence[Any]) -> Any:
    """Stack a list of examples field by field: tensors, tuples/lists of tensors, or dicts of tensors."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(items))
    if isinstance(first, dict):
        return {k: stack_collate([item[k] for item in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(stack_collate(list(field)) for field in zip(*items, strict=True))
    return torch.as_tensor(list(items))


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Train ``model`` on ``train_data`` with ``loss_fn``; write the run dir when ``run_dir`` is given.

    ``train_data`` / ``val_data``: map-style datasets (``len`` and ``[i]``); ``collate`` turns a
    list of items into a batch for ``loss_fn(model, batch) -> (loss_sum, count)``.
    ``parameters``: the trainable set (default: every parameter with ``requires_grad``).
    ``val_tokens_per_char``: tokens per character of the validation text, which turns the
    validation loss into nats per character (comparable across tokenizers).
    ``callbacks``: called as ``callback(trainer)`` after every optimizer step (``trainer.step`` is
    the new step count); raising KeyboardInterrupt there behaves like Ctrl-C.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        train_data: Any,
        *,
        val_data: Any = None,
        loss_fn: LossFn = next_token_loss,
        collate: Callable[[Sequence[Any]], Any] = stack_collate,
        parameters: Iterable[torch.nn.Parameter] | None = None,
        run_dir: str | Path | None = None,
        model_config: Any = None,
        tokenizer: Any = None,
        data_info: dict[str, Any] | None = None,
        val_tokens_per_char: float | None = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
        dist: distributed.DistContext | None = None,
    ):
        self.config = config
        self.dist = dist or distributed.DistContext(device=distributed.resolve_device(config.device))
        self.device = self.dist.device
        self.module = model.to(self.device)
        self.model = distributed.wrap(self.module, self.dist)
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn, self.collate = loss_fn, collate
        self.global_batch = config.batch_size * config.grad_accum * self.dist.world_size
        if len(train_data) < self.global_batch:
            raise DataError(f"the training data has {len(train_data)} examples, fewer than one batch of "
                            f"{self.global_batch}", "lower the batch size (or grad_accum), or use more data")
        if self.device.type == "cpu":
            keep_freed_memory()
        self._probe_note: str | None = None
        self.precision = resolve_precision(config.precision, self.device)
        if config.precision == "auto" and self.precision == "bf16" and self.device.type == "cpu":
            self.precision = self._probe_precision()
        self.params = [p for p in (parameters if parameters is not None else self.module.parameters())
                       if p.requires_grad]
        if not self.params:
            raise ConfigError("no trainable parameters", "pass parameters that require gradients")
        # fused: one kernel updates every parameter (CPU and CUDA), instead of a loop of small ops.
        fused = self.device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for p in self.params)
        self.optimizer = torch.optim.AdamW(param_groups(self.params, config.weight_decay), lr=config.lr,
                                           betas=(config.beta1, config.beta2), eps=config.eps,
                                           fused=fused or None)
        self.budget, self.schedule = config.budget(), config.schedule()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model_config = model_config if model_config is not None else getattr(model, "config", None)
        self.tokenizer = tokenizer
        self.data_info = data_info
        self.val_tokens_per_char = val_tokens_per_char
        self.callbacks = list(callbacks)
        # Progress counters (restored on resume).
        self.step = 0
        self.tokens = 0
        self.epoch = 0
        self.position = 0  # examples of this epoch's permutation already used (all ranks together)
        self.elapsed = 0.0  # wall-clock seconds over all sessions of this run
        self.last_loss = float("nan")
        self.last_eval: dict[str, Any] | None = None
        self.last_sample: str | None = None
        self._perm: tuple[int, torch.Tensor] | None = None
        self._consistent = True  # False while an update is half applied: no checkpoint then
        self._stop_requested = False
        self._session_start = 0.0
        self._elapsed_at_start = 0.0
        self._shared_elapsed = 0.0  # data-parallel: the ranks' mean clock at the last step (see progress)
        self._progress = Progress(False)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE) if self.run_dir and self.dist.is_main else None

    def _probe_precision(self) -> str:
        """On a CPU with bf16 matmuls: time a few forward/backward passes of this model in fp32 and bf16.

        AMX or AVX512-BF16 make large bf16 matrix products several times faster, but a small
        model's products are small and autocast adds casts, so which precision wins depends on the
        model; this measures it (about a second) instead of guessing.  The probe runs on a copy of the model
        with the random state restored, so training is unaffected.  Data-parallel ranks vote, and
        bf16 is used only if every rank found it faster.  Models under ``PROBE_MIN_PARAMETERS`` get
        fp32 without a probe: the choice would be a coin toss on timing noise (the 0.79M demo model
        measured 44 ms fp32 against 42 ms bf16 on a Zen 4), and two runs of the same small
        config should not train in different precisions by chance.
        """
        import copy

        n_params = sum(p.numel() for p in self.module.parameters())
        if n_params < PROBE_MIN_PARAMETERS:
            self._probe_note = (f"precision auto: fp32 ({n_params / 1e6:.2f}M parameters: too small to gain "
                                "from bf16 matmuls, not probed)")
            return "fp32"
        examples = [self.train_data[i] for i in range(self.config.batch_size)]
        batch = to_device(self.collate(examples), self.device)
        probe = copy.deepcopy(self.module).train()
        best = {False: math.inf, True: math.inf}
        with torch.random.fork_rng(devices=[]):
            for bf16 in (False, True):  # warm-up: the first bf16 call builds its kernels
                _timed_backward(probe, self.loss_fn, batch, bf16, self.device)
            for _ in range(3):
                for bf16 in (False, True):
                    seconds = _timed_backward(probe, self.loss_fn, batch, bf16, self.device)
                    best[bf16] = min(best[bf16], seconds)
        vote = torch.tensor([1.0 if best[True] < 0.9 * best[False] else 0.0], device=self.device)
        distributed.all_reduce_sum(vote, self.dist)
        choice = "bf16" if int(vote.item()) == self.dist.world_size else "fp32"
        self._probe_note = (f"precision auto: {choice} (forward+backward {best[False] * 1e3:.0f} ms fp32, "
                            f"{best[True] * 1e3:.0f} ms bf16)")
        return choice

    # --- state ------------------------------------------------------------------------------------

    def training_dict(self) -> dict[str, Any]:
        """The training config as saved: ``precision`` resolved, so a resume compares like with like."""
        return {**self.config.to_dict(), "precision": self.precision}

    @property
    def epochs(self) -> float:
        return self.epoch + self.position / len(self.train_data)

    def progress(self) -> float:
        """Fraction of the budget spent.  Data-parallel ranks use the clock they agreed on at the last
        step, so that they compute the same learning rate and stop after the same step."""
        elapsed = self._shared_elapsed if self.dist.enabled else self._now()
        return self.budget.progress(self.step, self.epochs, self.tokens, elapsed)

    def _now(self) -> float:
        return self._elapsed_at_start + (time.perf_counter() - self._session_start)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    def _train_state(self) -> ckpt.TrainState:
        """Collective on every rank (RNG gather); only rank 0 uses the result."""
        rng_tensors, rng_info = ckpt.pack_rng(distributed.gather_rng_states(self.dist))
        tensors = {**ckpt.pack_optimizer(self.optimizer), **rng_tensors}
        info = {
            "step": self.step, "tokens": self.tokens, "epoch": self.epoch, "position": self.position,
            "data_seed": self.config.seed, "dataset_size": len(self.train_data),
            "world_size": self.dist.world_size, "elapsed": self._now(),
            "scheduler": {"kind": "warmup_cosine", "progress": self.progress(),
                          "lr": self.optimizer.param_groups[0]["lr"]},
            "rng": rng_info,
        }
        return ckpt.TrainState(info=info, tensors=tensors)

    def save(self) -> None:
        """Checkpoint the state after ``self.step`` updates (rank 0 writes; every rank takes part)."""
        if self.run_dir is None:
            return
        state = self._train_state()
        if self.dist.is_main:
            ckpt.save_run(self.run_dir, self.module, self.model_config, self.tokenizer, state,
                          training=self.training_dict(), data=self.data_info)
            fsync_append(self.run_dir / METRICS_FILE)
            with contextlib.suppress(FileNotFoundError):
                plot_losses(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / PLOT_FILE,
                            title=self._plot_title())
        distributed.barrier(self.dist)

    def _plot_title(self) -> str:
        name = getattr(self.model_config, "name", "")
        return f"{name} · step {self.step} · {self.tokens:,} tokens"

    def check_resumable(self) -> ckpt.TrainState:
        """Validate the run dir against this trainer; nothing is written.  Returns its training state."""
        if self.run_dir is None:
            raise ConfigError("resuming needs a run dir", "pass run_dir")
        fix = "resume with the run's own settings, or start a new run with another --out"
        where = f"cannot resume {self.run_dir}"
        payload = ckpt.read_run_config(self.run_dir)
        if self.model_config is not None and hasattr(self.model_config, "to_dict"):
            saved, current = ckpt.run_model_config(payload).to_dict(), self.model_config.to_dict()
            saved.pop("name", None)
            current.pop("name", None)
            diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
            if diff:
                k = diff[0]
                raise CheckpointError(f"{where}: the model config differs "
                                      f"({k}: run has {saved.get(k)!r}, now {current.get(k)!r})", fix)
        saved_training = payload.get("training") or {}
        if self.config.precision == "auto" and saved_training.get("precision") in ("fp32", "bf16"):
            self.precision = saved_training["precision"]  # the run's own resolution of "auto"
        current = self.training_dict()
        for key in TrainConfig.TRAJECTORY:
            if key in saved_training and saved_training[key] != current[key]:
                raise CheckpointError(f"{where}: {key} differs "
                                      f"(run has {saved_training[key]!r}, now {current[key]!r})", fix)
        state = ckpt.load_train_state(self.run_dir)
        info = state.info
        if info.get("world_size", 1) != self.dist.world_size:
            raise CheckpointError(f"{where}: it ran on {info.get('world_size')} processes, "
                                  f"now {self.dist.world_size}", "resume with the same number of processes")
        if info.get("dataset_size") != len(self.train_data):
            raise CheckpointError(f"{where}: the training data changed ({info.get('dataset_size')} "
                                  f"examples in the run, {len(self.train_data)} now)",
                                  "resume with the run's own data and tokenizer")
        return state

    def restore(self, state: ckpt.TrainState) -> None:
        """Load weights, optimizer, RNG and counters from the run dir (after ``check_resumable``)."""
        assert self.run_dir is not None
        ckpt.load_weights_into(self.module, self.run_dir / ckpt.WEIGHTS_FILE)
        ckpt.unpack_optimizer(self.optimizer, state.tensors)
        ckpt.unpack_rng(state.tensors, state.info["rng"], self.dist.rank)
        info = state.info
        self.step, self.tokens = int(info["step"]), int(info["tokens"])
        self.epoch, self.position = int(info["epoch"]), int(info["position"])
        self.elapsed = float(info["elapsed"])

    # --- data ---------------------------------------------------------------------------------

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
            self._perm = (self.epoch, torch.randperm(len(self.train_data), generator=g))
        return self._perm[1]

    def _micro_batches(self) -> Iterator[Any]:
        """This rank's micro-batches of the next step; advances the data position."""
        indices = self._permutation()[self.position:self.position + self.global_batch].tolist()
        self.position += self.global_batch
        if self.position + self.global_batch > len(self.train_data):
            self.epoch, self.position = self.epoch + 1, 0  # the incomplete last batch of an epoch is dropped
        b, world, rank = self.config.batch_size, self.dist.world_size, self.dist.rank
        for m in range(self.config.grad_accum):
            chunk = indices[m * b * world:(m + 1) * b * world]
            yield self.collate([self.train_data[i] for i in chunk[rank * b:(rank + 1) * b]])

    # --- one step ---------------------------------------------------------------------------------

    def _train_step(self, lr: float) -> tuple[float, float, int]:
        """One optimizer update; returns (mean loss, grad norm, tokens) over all ranks."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        accum = self.config.grad_accum
        self._consistent = False
        for m, batch in enumerate(self._micro_batches()):
            batch = to_device(batch, self.device)
            sync = m == accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    loss, n = self.loss_fn(self.model, batch)
                loss.backward()
            loss_sum += loss.detach().double()
            count += n.detach().double() if isinstance(n, torch.Tensor) else float(n)
        flags = torch.tensor([1.0 if self._stop_requested else 0.0, self._now()], dtype=torch.float64,
                             device=self.device)
        totals = torch.cat([loss_sum[None], count[None], flags])
        distributed.all_reduce_sum(totals, self.dist)
        total_loss, total_count, stops, clocks = totals.tolist()
        self._shared_elapsed = clocks / self.dist.world_size
        if total_count <= 0:
            raise DataError("a training batch has no target tokens", "check the data and its masking")
        # DDP averaged the summed gradients over ranks; turn that into the gradient of the global mean.
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, self.dist.world_size / total_count)
        if self.config.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(total_count)
        self._consistent = True
        self._stop_requested = stops > 0
        return total_loss / total_count, norm, int(total_count)

    # --- evaluation -------------------------------------------------------------------------------

    def _eval_indices(self, n: int) -> list[int]:
        """Fixed, evenly spread examples: the same windows at every evaluation, so curves are smooth.

        ``eval_batches`` 0: every example."""
        if self.config.eval_batches == 0:
            return list(range(n))
        want = min(n, self.config.eval_batches * self.global_batch)
        return torch.linspace(0, n - 1, want).round().long().tolist()

    @torch.no_grad()
    def _split_loss(self, dataset: Any, everything: bool = False) -> float:
        indices = list(range(len(dataset))) if everything else self._eval_indices(len(dataset))
        b = self.config.batch_size
        batches = [indices[i:i + b] for i in range(0, len(indices), b)]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for chunk in batches[self.dist.rank::self.dist.world_size]:
            batch = to_device(self.collate([dataset[i] for i in chunk]), self.device)
            with self._autocast():
                loss, n = self.loss_fn(self.module, batch)
            totals[0] += loss.double()
            totals[1] += n.double() if isinstance(n, torch.Tensor) else float(n)
        distributed.all_reduce_sum(totals, self.dist)
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Train and validation loss on fixed windows; perplexity and nats per character.

        ``final``: the validation loss covers every validation example (the figure a run is judged
        by), not just the fixed subset that keeps periodic evaluations cheap.  With ``eval_batches``
        0 every evaluation covers every example of both splits.
        """
        was_training = self.module.training
        self.module.eval()
        try:
            train_loss = self._split_loss(self.train_data)
            val_loss = None if self.val_data is None else self._split_loss(self.val_data, everything=final)
        finally:
            self.module.train(was_training)
        record: dict[str, Any] = {
            "kind": "eval", "step": self.step, "tokens": self.tokens, "epochs": round(self.epochs, 6),
            "elapsed": round(self._now(), 3),
            "train_loss": train_loss, "val_loss": val_loss,
            "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None,
            "val_nats_per_char": (val_loss * self.val_tokens_per_char
                                  if val_loss is not None and self.val_tokens_per_char else None),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        if final:
            record["final"] = True
        self.last_eval = record
        return record

    def sample(self) -> str | None:
        """A text sample from the current model (rank 0); the training RNG streams are left untouched."""
        if not self.dist.is_main or self.tokenizer is None or self.config.sample_tokens == 0:
            return None
        from scratchlm.generation import SamplingParams, generate

        params = SamplingParams(max_new_tokens=self.config.sample_tokens,
                                temperature=self.config.sample_temperature, seed=self.config.seed + self.step)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return generate(self.module, self.tokenizer, self.config.sample_prompt, params)

    def _eval_and_sample(self, final: bool = False) -> None:
        record = self.evaluate(final)
        text = self.sample()
        if not self.dist.is_main:
            return
        if self.metrics is not None:
            self.metrics.write(record)
        nats = record["val_nats_per_char"]
        val = record["val_loss"]
        summary = f"step {self.step}: train {record['train_loss']:.4f}"
        if val is not None:
            summary += f", val {val:.4f}" + (f" ({nats:.4f} nats/char)" if nats is not None else "")
        summary += f", {record['elapsed']:.0f} s"
        self._say(summary)
        if text is not None and self.run_dir is not None:
            note = f"val {nats:.3f} nats/char" if nats is not None else ""
            append_sample(self.run_dir / SAMPLES_FILE, self.step, self.config.sample_prompt, text, note)
        self.last_sample = text

    # --- the loop ---------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if not (self.dist.is_main and self.config.progress):
            return
        if self._progress.bar is not None:
            self._progress.write(message)
        else:
            print(message, file=sys.stderr)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """First Ctrl-C: finish the current step, save, stop.  A second one stops at once, unsaved."""
        self._stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._say("interrupt: finishing this step and saving a checkpoint "
                  "(Ctrl-C again to quit without saving)")

    def fit(self, resume: bool = False) -> TrainResult:
        """Train until the budget is spent; with ``resume``, continue the run in ``run_dir`` exactly."""
        if resume:
            state = self.check_resumable()  # raises before anything is written
            self.restore(state)
        else:
            torch.manual_seed(self.config.seed + self.dist.rank)
            random.seed(self.config.seed + self.dist.rank)
            import numpy as np

            np.random.seed((self.config.seed + self.dist.rank) % 2**32)
        if self.run_dir is not None and self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.run_dir)
            if resume:
                self.metrics.truncate_after(self.step)
                if (self.run_dir / SAMPLES_FILE).exists():
                    with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as f:
                        f.write(f"=== resumed at step {self.step} ===\n\n")
        self._elapsed_at_start = self._shared_elapsed = self.elapsed
        self._session_start = time.perf_counter()
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        start_progress = self.progress()
        self._progress = Progress(self.config.progress and self.dist.is_main,
                                  initial=min(1.0, start_progress))
        if self._probe_note:
            self._say(self._probe_note)
        if resume:
            self._say(f"resumed {self.run_dir} at step {self.step} "
                      f"({self.tokens:,} tokens, {self.elapsed:.0f} s)")
        try:
            self._loop(start_progress)
        except KeyboardInterrupt:
            if self._consistent and self.run_dir is not None:
                self._progress.close()
                self.save()
                self._say(f"saved a checkpoint at step {self.step} in {self.run_dir}")
            raise
        finally:
            self._progress.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        self.elapsed = self._now()
        return TrainResult(self.step, self.tokens, self.elapsed, self.last_eval, self.last_sample,
                           self.run_dir)

    def _loop(self, start_progress: float) -> None:
        cfg = self.config
        rate_tokens, rate_time = 0, 0.0  # for the tokens/s estimate (since the last display)
        last_display = 0.0
        progress = start_progress
        if cfg.eval_at_start and self.step == 0:
            self._eval_and_sample()
        while progress < 1.0:
            lr = self.schedule(self.step, progress)
            epoch = self.epoch
            t0 = time.perf_counter()
            loss, norm, tokens = self._train_step(lr)
            dt = time.perf_counter() - t0
            self.last_loss = loss
            rate_tokens, rate_time = rate_tokens + tokens, rate_time + dt
            progress = self.progress()
            if self.metrics is not None and self.step % cfg.log_every == 0:
                self.metrics.write({"kind": "train", "step": self.step, "tokens": self.tokens,
                                    "elapsed": round(self._now(), 3), "loss": loss, "lr": lr,
                                    "grad_norm": norm, "tokens_per_s": round(tokens / dt, 1)})
            now = time.perf_counter()
            if now - last_display > 0.5 or progress >= 1.0:
                self._progress.update(progress, self.step, loss, rate_tokens / max(rate_time, 1e-9),
                                      self._now(), now - self._session_start, start_progress)
                rate_tokens, rate_time, last_display = 0, 0.0, now
            due = self.epoch != epoch if cfg.eval_every == "epoch" else bool(
                cfg.eval_every and self.step % cfg.eval_every == 0)
            if due and progress < 1.0:
                self._eval_and_sample()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
            for callback in self.callbacks:
                callback(self)
            if self._stop_requested:
                raise KeyboardInterrupt
            progress = self.progress()
        self._progress.close()
        self._eval_and_sample(final=True)
        self.save()
