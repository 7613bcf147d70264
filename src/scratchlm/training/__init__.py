"""Training: the one loop (``trainer``), its config, schedule, losses, evaluators, logging and
data parallelism.

Pretraining and every finetuning task are a dataset + a loss function + a set of trainable
parameters + an evaluator handed to :class:`Trainer`.  This package imports torch.
"""

from scratchlm.data.collate import stack_collate
from scratchlm.training.config import TrainConfig, TrainResult
from scratchlm.training.evaluators import LanguageModelEvaluator, LossEvaluator, Totals
from scratchlm.training.logprobs import IGNORE_INDEX, SequenceLogProbs, sequence_logprobs, token_logprobs
from scratchlm.training.losses import LossOutput, next_token_loss
from scratchlm.training.optim import param_groups
from scratchlm.training.schedule import Budget, WarmupDecay
from scratchlm.training.trainer import Trainer

__all__ = [
    "Trainer", "TrainConfig", "TrainResult", "Budget", "WarmupDecay", "LossOutput", "next_token_loss",
    "IGNORE_INDEX", "LossEvaluator", "LanguageModelEvaluator", "Totals", "SequenceLogProbs",
    "sequence_logprobs", "token_logprobs", "param_groups", "stack_collate",
]
