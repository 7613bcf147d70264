"""scratchlm: language models from scratch.

Importing the package is cheap: heavy modules (torch, the models) load on first use, so the CLI
starts fast.  ``scratchlm.load(ref)`` is the one handle to a model; see ``scratchlm.api``.
"""

from __future__ import annotations

from scratchlm.errors import CheckpointError, ConfigError, DataError, UserError

__version__ = "0.1.0"
__all__ = ["UserError", "DataError", "ConfigError", "CheckpointError", "load", "LM", "__version__"]


def __getattr__(name: str):
    # Lazy: `load` and `LM` pull in torch; keep `import scratchlm` light for the CLI.
    if name in ("load", "LM"):
        from scratchlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'scratchlm' has no attribute {name!r}")
