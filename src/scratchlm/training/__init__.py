"""Training: the one loop (``trainer``), its schedule, losses, logging and data parallelism.

Pretraining and every finetuning task are a dataset + a loss function + a set of trainable
parameters handed to :class:`Trainer`.  This package imports torch.
"""

from scratchlm.training.losses import IGNORE_INDEX, next_token_loss
from scratchlm.training.schedule import Budget, WarmupCosine
from scratchlm.training.trainer import TrainConfig, Trainer, TrainResult, param_groups, stack_collate

__all__ = [
    "Trainer", "TrainConfig", "TrainResult", "Budget", "WarmupCosine", "next_token_loss", "IGNORE_INDEX",
    "param_groups", "stack_collate",
]
