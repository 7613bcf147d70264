"""Data: embedded corpora, train/validation splits, sliding-window LM datasets, batching."""
