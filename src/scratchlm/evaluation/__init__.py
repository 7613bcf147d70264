"""Evaluation: perplexity (sliding window), ROUGE, multiple choice by log-likelihood, Elo and
Bradley–Terry rankings, an LLM judge, one report page, and the bag-of-words baseline.

Submodules import torch (or scikit-learn); import them directly, e.g.
``from scratchlm.evaluation.perplexity import perplexity``, so that importing this package stays light.
"""
