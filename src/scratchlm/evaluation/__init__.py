"""Evaluation: perplexity (sliding window), and the task metrics the finetuning work adds beside it.

Submodules import torch (or scikit-learn); import them directly, e.g.
``from scratchlm.evaluation.perplexity import perplexity``, so that importing this package stays light.
"""
