"""Models: one transformer decoder for every family (configured by ``ModelConfig``); n-gram, RNN beside it."""

from scratchlm.models.config import ModelConfig, from_preset, list_presets

__all__ = ["ModelConfig", "from_preset", "list_presets", "build_model", "build_empty_model"]


def _model_class(config: ModelConfig):
    if config.arch == "ngram":
        from scratchlm.models.ngram_module import NGramLM

        return NGramLM
    if config.arch in ("elman", "lstm"):
        from scratchlm.models.rnn import RecurrentLM

        return RecurrentLM
    from scratchlm.models.transformer import Transformer

    return Transformer


def build_model(config: ModelConfig):
    """The ``nn.Module`` for a config: a ``Transformer``, a ``RecurrentLM`` for arch elman / lstm, or
    an unfitted ``NGramLM`` for arch ngram (imports torch on first use)."""
    return _model_class(config)(config)


def build_empty_model(config: ModelConfig, device="cpu", dtype=None):
    """``build_model`` with allocated but uninitialised weights on ``device``, to load a checkpoint into."""
    import torch

    return _model_class(config).empty(config, device=device, dtype=dtype or torch.float32)
