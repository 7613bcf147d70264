"""Finetuning: LoRA adapters (``finetune.lora``) and the recipes built over the one training loop.

Kept light: importing ``scratchlm.finetune`` imports nothing heavy; each submodule imports what it needs.
"""
