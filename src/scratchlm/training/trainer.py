"""THE training loop: a dataset, a loss function, a set of trainable parameters and an evaluator.

Pretraining is one caller (``scratchlm.cli.pretrain``); finetuning (classification, instruction
tuning, LoRA, DPO) is another dataset, loss, parameter set and evaluator over this same loop:

* AdamW (or plain SGD) with weight decay on matrices only, or on the caller's groups (``optim.py``);
* linear warmup, then cosine decay to ``min_lr`` over the budget (``schedule.py``);
* gradient clipping and gradient accumulation, exact: a loss returns sums (``LossOutput``), which
  the loop adds over micro-batches and processes and divides once per step by the global count;
* bf16 autocast (float32 master weights and optimizer state) where the device does bf16 fast;
* evaluation every ``eval_every`` steps (or every epoch) on fixed examples of each split, or on
  all of them; the evaluator names the figures and may add a sample (``evaluators.py``);
* budgets in steps, epochs, counted items or wall-clock seconds, whichever comes first;
* the run dir: checkpoints every ``save_every`` steps and at the end, a last one on Ctrl-C, and
  exact resumption (``resume.py``);
* data parallelism through ``torchrun`` (``distributed.py``).

The data order is a seeded permutation per epoch, recomputed from ``(seed, epoch)``, so a
checkpoint only records the epoch and how far into it the run is.
"""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from scratchlm import runtime
from scratchlm.checkpoint import io as ckpt
from scratchlm.data.collate import stack_collate, to_device
from scratchlm.errors import ConfigError, DataError
from scratchlm.models.config import ModelConfig
from scratchlm.tokenizers import Tokenizer
from scratchlm.training import distributed, precision, resume
from scratchlm.training.config import TrainConfig, TrainResult
from scratchlm.training.evaluators import Evaluator, LossEvaluator, Totals, eval_record, sum_outputs
from scratchlm.training.logging import (
    METRICS_FILE,
    PLOT_FILE,
    SAMPLES_FILE,
    MetricsLog,
    Progress,
    fsync_append,
    plot_losses,
    read_metrics,
)
from scratchlm.training.losses import LossFn, LossOutput, next_token_loss
from scratchlm.training.optim import ParamGroup, build_optimizer, optimizer_groups


class Trainer:
    """Train ``model`` on ``train_data`` with ``loss_fn``; write the run dir when ``run_dir`` is given.

    ``train_data`` / ``val_data``: map-style datasets (``len`` and ``[i]``); ``collate`` turns a
    list of items into a batch for ``loss_fn(model, batch) -> LossOutput``.  Each epoch visits
    ``train_data`` in a random order seeded by the run's seed and the epoch, or in the order its
    ``epoch_order(generator, global_batch) -> LongTensor`` (a permutation of its indices) draws
    from that generator (``finetune.instruct.LengthGrouped``), so resuming replays it exactly.
    ``parameters``: the trainable set (default: every parameter with ``requires_grad``), or AdamW
    parameter groups (dicts with ``"params"`` and optionally ``"weight_decay"``).
    ``evaluator``: names the evaluation figures (default ``LossEvaluator``: losses and metric means).
    ``callbacks``: called as ``callback(trainer)`` after every optimizer step (``trainer.step`` is
    the new step count); raising KeyboardInterrupt there behaves like Ctrl-C.
    ``run_info``: what else the run dir's ``config.json`` records (``"data"``, ``"evaluation"``...).
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
        parameters: Iterable[torch.nn.Parameter] | Sequence[ParamGroup] | None = None,
        evaluator: Evaluator | None = None,
        run_dir: str | Path | None = None,
        model_config: ModelConfig | None = None,
        tokenizer: Tokenizer | None = None,
        run_info: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callable[[Trainer], None]] = (),
        dist: distributed.DistContext | None = None,
    ):
        self.config = config
        self.dist = dist or distributed.DistContext(device=runtime.resolve_device(config.device))
        self.device = self.dist.device
        self.module = model.to(self.device)
        self.model = distributed.wrap(self.module, self.dist)
        self.train_data, self.val_data = train_data, val_data
        self.loss_fn, self.collate = loss_fn, collate
        self.evaluator: Evaluator = evaluator or LossEvaluator()
        self.global_batch = config.batch_size * config.grad_accum * self.dist.world_size
        if len(train_data) < self.global_batch:
            raise DataError(f"the training data has {len(train_data)} examples, fewer than one batch of "
                            f"{self.global_batch}", "lower the batch size (or grad_accum), or use more data")
        if self.device.type == "cpu":
            runtime.keep_freed_memory()
        groups = optimizer_groups(parameters if parameters is not None else self.module.parameters(),
                                  config.weight_decay)
        # In the model's own order: the gradient norm sums over them, and float sums depend on order.
        trainable = {id(p) for g in groups for p in g["params"]}
        self.params = [p for p in self.module.parameters() if id(p) in trainable]
        if len(self.params) != len(trainable):
            raise ConfigError("some trainable parameters are not the model's",
                              "pass the model's own parameters")
        if not self.params:
            raise ConfigError("no trainable parameters", "pass parameters that require gradients")
        self._probe_note: str | None = None
        self.precision = runtime.resolve_precision(config.precision, self.device)
        if config.precision == "auto" and self.precision == "bf16" and self.device.type == "cpu":
            self.precision = self._probe_precision()
        self.optimizer = build_optimizer(groups, config, self.device)
        self.budget, self.schedule = config.budget(), config.schedule()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.model_config = model_config if model_config is not None else getattr(model, "config", None)
        self.tokenizer = tokenizer
        self.run_info = dict(run_info or {})
        self.callbacks = list(callbacks)
        # Progress counters (restored on resume).
        self.step = 0
        self.tokens = 0  # items the loss counted (tokens, examples, pairs: ``evaluator.unit``)
        self.epoch = 0
        self.position = 0  # examples of this epoch's permutation already used (all ranks together)
        self.elapsed = 0.0  # wall-clock seconds over all sessions of this run
        self.last_loss = float("nan")
        self.last_eval: dict[str, Any] | None = None
        self.last_sample: str | None = None
        self._perm: tuple[int, torch.Tensor] | None = None
        self._consistent = True  # False while an update is half applied: no checkpoint then
        self._stop_requested = False  # set by Ctrl-C on this process; never cleared by a step
        self._stop_agreed = False  # a stop was requested on some rank by the last step (all-reduced)
        self._session_start = 0.0
        self._elapsed_at_start = 0.0
        self._shared_elapsed = 0.0  # data-parallel: the ranks' mean clock at the last step (see progress)
        self._progress = Progress(False)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE) if self.run_dir and self.dist.is_main else None

    def _probe_precision(self) -> str:
        """Time this model's forward/backward in fp32 and bf16 (``precision.choose_precision``);
        data-parallel ranks vote, and bf16 is used only if every rank found it faster."""
        batch = to_device(self.collate([self.train_data[i] for i in range(self.config.batch_size)]),
                          self.device)

        def agree(bf16: bool) -> bool:
            vote = torch.tensor([float(bf16)], device=self.device)
            return int(distributed.all_reduce_sum(vote, self.dist).item()) == self.dist.world_size

        choice, self._probe_note = precision.choose_precision(
            self.module, lambda model: self.loss_fn(model, batch).loss_sum, self.device, agree)
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

    def save(self) -> None:
        """Checkpoint the state after ``self.step`` updates (rank 0 writes; every rank takes part)."""
        if self.run_dir is None:
            return
        info = {"step": self.step, "tokens": self.tokens, "epoch": self.epoch, "position": self.position,
                "data_seed": self.config.seed, "dataset_size": len(self.train_data),
                "world_size": self.dist.world_size, "elapsed": self._now(),
                "scheduler": {"kind": "warmup_cosine", "progress": self.progress(),
                              "lr": self.optimizer.param_groups[0]["lr"]}}
        state = resume.pack_state(self.optimizer, distributed.gather_rng_states(self.dist), info)
        if self.dist.is_main:
            ckpt.save_run(self.run_dir, self.module, self.model_config, self.tokenizer, state,
                          training=self.training_dict(), **self.run_info)
            fsync_append(self.run_dir / METRICS_FILE)
            with contextlib.suppress(FileNotFoundError):
                name = getattr(self.model_config, "name", "")
                plot_losses(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / PLOT_FILE,
                            title=f"{name} · step {self.step} · {self.tokens:,} {self.evaluator.unit}",
                            extra=self.evaluator.plot_metrics, unit=self.evaluator.unit)
        distributed.barrier(self.dist)

    def check_resumable(self) -> ckpt.TrainState:
        """Validate the run dir against this trainer (nothing is written); returns its training state."""
        if self.run_dir is None:
            raise ConfigError("resuming needs a run dir", "pass run_dir")
        if self.config.precision == "auto" and (saved := resume.saved_precision(self.run_dir)):
            self.precision = saved  # the run's own resolution of "auto"
        return resume.check_resumable(self.run_dir, model_config=self.model_config,
                                      training=self.training_dict(), world_size=self.dist.world_size,
                                      dataset_size=len(self.train_data))

    def restore(self, state: ckpt.TrainState) -> None:
        """Load weights, optimizer, RNG and counters from the run dir (after ``check_resumable``)."""
        assert self.run_dir is not None
        resume.restore_state(self.module, self.optimizer, self.run_dir, state, self.dist.rank)
        info = state.info
        self.step, self.tokens = int(info["step"]), int(info["tokens"])
        self.epoch, self.position = int(info["epoch"]), int(info["position"])
        self.elapsed = float(info["elapsed"])

    # --- data and sums ----------------------------------------------------------------------------

    def _permutation(self) -> torch.Tensor:
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
            order = getattr(self.train_data, "epoch_order", None)  # e.g. batches grouped by length
            perm = order(g, self.global_batch) if callable(order) else torch.randperm(len(self.train_data),
                                                                                       generator=g)
            self._perm = (self.epoch, perm)
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

    def _reduce(self, outputs: list[LossOutput], extra: Sequence[float] = ()) -> tuple[Totals, list[float]]:
        """Sum over micro-batches (or batches) and processes: one all-reduce per step."""
        return sum_outputs(outputs, self.device, lambda t: distributed.all_reduce_sum(t, self.dist), extra)

    # --- one step ---------------------------------------------------------------------------------

    def _train_step(self, lr: float) -> tuple[Totals, float]:
        """One optimizer update; returns the step's totals over all ranks and the gradient norm."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        outputs = []
        self._consistent = False
        for m, batch in enumerate(self._micro_batches()):
            batch = to_device(batch, self.device)
            sync = m == self.config.grad_accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self._autocast():
                    out = self.loss_fn(self.model, batch)
                out.loss_sum.backward()
            outputs.append(out)
        totals, (stops, clocks) = self._reduce(outputs, [float(self._stop_requested), self._now()])
        self._shared_elapsed = clocks / self.dist.world_size
        if totals.count <= 0:
            raise DataError("a training batch has nothing to learn from (no target tokens or examples)",
                            "check the data and its masking")
        # DDP averaged the summed gradients over ranks; turn that into the gradient of the global mean.
        grads = [p.grad for p in self.params if p.grad is not None]
        torch._foreach_mul_(grads, self.dist.world_size / totals.count)
        if self.config.grad_clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(totals.count)
        self._consistent = True
        # Decided from the all-reduced flags, so every rank stops after the same step; a Ctrl-C that
        # lands after this step's snapshot is kept in _stop_requested for the next one.
        self._stop_agreed = stops > 0
        return totals, norm

    # --- evaluation -------------------------------------------------------------------------------

    def _eval_indices(self, n: int) -> list[int]:
        """Fixed, evenly spread examples: the same ones at every evaluation, so curves are smooth.

        ``eval_batches`` 0: every example."""
        if self.config.eval_batches == 0:
            return list(range(n))
        want = min(n, self.config.eval_batches * self.global_batch)
        return torch.linspace(0, n - 1, want).round().long().tolist()

    @torch.no_grad()
    def _split_totals(self, dataset: Any, everything: bool = False) -> Totals:
        indices = list(range(len(dataset))) if everything else self._eval_indices(len(dataset))
        b = self.config.batch_size
        batches = [indices[i:i + b] for i in range(0, len(indices), b)]
        outputs = []
        for chunk in batches[self.dist.rank::self.dist.world_size]:
            batch = to_device(self.collate([dataset[i] for i in chunk]), self.device)
            with self._autocast():
                outputs.append(self.loss_fn(self.module, batch))
        return self._reduce(outputs)[0]

    def evaluate_split(self, dataset: Any) -> Totals:
        """The loss and metric sums over every example of ``dataset`` (a test split, say)."""
        with runtime.evaluating(self.module):
            return self._split_totals(dataset, everything=True)

    def evaluate(self, final: bool = False) -> dict[str, Any]:
        """Evaluate on fixed examples of both splits; the evaluator names the figures.

        ``final``: the validation split is covered whole (the figure a run is judged by), not
        just the fixed subset that keeps periodic evaluations cheap.
        """
        with runtime.evaluating(self.module):
            train = self._split_totals(self.train_data)
            val = None if self.val_data is None else self._split_totals(self.val_data, everything=final)
        figures = {**self.evaluator.figures("train", train), **self.evaluator.figures("val", val)}
        self.last_eval = eval_record(self.step, self.tokens, self.epochs, self._now(),
                                     self.optimizer.param_groups[0]["lr"], figures, final)
        return self.last_eval

    def _eval_and_sample(self, final: bool = False) -> None:
        record = self.evaluate(final)
        if not self.dist.is_main:
            return
        if self.metrics is not None:
            self.metrics.write(record)
        self._say(f"step {self.step}: {self.evaluator.describe(record)}, {record['elapsed']:.0f} s")
        with runtime.evaluating(self.module):
            self.last_sample = self.evaluator.sample(self.module, record, self.run_dir)

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

    def _seed(self) -> None:
        import numpy as np

        torch.manual_seed(self.config.seed + self.dist.rank)
        random.seed(self.config.seed + self.dist.rank)
        np.random.seed((self.config.seed + self.dist.rank) % 2**32)

    def fit(self, resume: bool = False) -> TrainResult:
        """Train until the budget is spent; with ``resume``, continue the run in ``run_dir`` exactly."""
        if resume:
            self.restore(self.check_resumable())  # the check raises before anything is written
        else:
            self._seed()
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
                                  initial=min(1.0, start_progress), unit=self.evaluator.unit)
        if self._probe_note:
            self._say(self._probe_note)
        if resume:
            self._say(f"resumed {self.run_dir} at step {self.step} "
                      f"({self.tokens:,} {self.evaluator.unit}, {self.elapsed:.0f} s)")
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
        rate_items, rate_time = 0, 0.0  # for the items/s estimate (since the last display)
        last_display = 0.0
        progress = start_progress
        if cfg.eval_at_start and self.step == 0:
            self._eval_and_sample()
        while progress < 1.0:
            lr = self.schedule(self.step, progress)
            epoch = self.epoch
            t0 = time.perf_counter()
            totals, norm = self._train_step(lr)
            dt = time.perf_counter() - t0
            self.last_loss = totals.loss
            rate_items, rate_time = rate_items + int(totals.count), rate_time + dt
            progress = self.progress()
            if self.metrics is not None and self.step % cfg.log_every == 0:
                unit = self.evaluator.unit
                self.metrics.write({"kind": "train", "step": self.step, "tokens": self.tokens,
                                    "elapsed": round(self._now(), 3), "loss": totals.loss, "lr": lr,
                                    "grad_norm": norm, f"{unit}_per_s": round(totals.count / dt, 1),
                                    **totals.means()})
            now = time.perf_counter()
            if now - last_display > 0.5 or progress >= 1.0:
                self._progress.update(progress, self.step, totals.loss, rate_items / max(rate_time, 1e-9),
                                      self._now(), now - self._session_start, start_progress)
                rate_items, rate_time, last_display = 0, 0.0, now
            due = self.epoch != epoch if cfg.eval_every == "epoch" else bool(
                cfg.eval_every and self.step % cfg.eval_every == 0)
            if due and progress < 1.0:
                self._eval_and_sample()
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save()
            for callback in self.callbacks:
                callback(self)
            if self._stop_agreed:
                raise KeyboardInterrupt
            progress = self.progress()
        self._progress.close()
        self._eval_and_sample(final=True)
        self.save()
