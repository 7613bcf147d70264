"""Checkpoints: our run dirs (``io``), Hugging Face directories and hub ids (``hf``).

Submodules import torch; import them directly (``from scratchlm.checkpoint.hf import load_hf``)
so that ``import scratchlm.checkpoint`` stays light for the CLI.
"""
