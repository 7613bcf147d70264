"""Checkpoints: our run dirs (``io``), Hugging Face directories and hub ids (``hf``), llama.cpp's
GGUF files (``gguf`` over ``gguf_file``), and the atomic writes every saver uses (``atomic``).

Submodules other than ``atomic`` and ``gguf_file`` import torch; import them directly
(``from scratchlm.checkpoint.hf import load_hf``) so that ``import scratchlm.checkpoint`` stays
light for the CLI.
"""
