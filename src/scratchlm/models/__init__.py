"""Models: one transformer decoder for every family (configured by ``ModelConfig``); n-gram, RNN beside it."""

from scratchlm.models.config import ModelConfig, from_preset, list_presets

__all__ = ["ModelConfig", "from_preset", "list_presets", "build_model"]


def build_model(config: ModelConfig):
    """The ``nn.Module`` for a config (imports torch on first use)."""
    from scratchlm.models.transformer import Transformer

    return Transformer(config)
