"""Data: embedded corpora, sliding-window LM datasets, and (later) task datasets."""
