"""Data: embedded corpora, train/validation splits, sliding-window LM datasets, batching, instruction
examples (Alpaca, prompt/completion, chat) and preference pairs."""
