"""Bag-of-words text classification (Burkov §2.1): binary word-presence features and a small MLP.

A document becomes a vector with one dimension per vocabulary word (the sorted unique words of the
training documents): 1 if the word occurs in it, 0 if not.  Word order is lost, and a word never
seen in training is dropped, which is why Burkov moves on to n-grams and embeddings.  The
classifier is his ``SimpleClassifier``: Linear(|V|, hidden) -> ReLU -> Linear(hidden, classes),
trained full-batch with plain SGD on the cross-entropy of the softmax of its logits — through
the one training loop (``training.Trainer``: ``optimizer="sgd"``, a constant rate, the whole
data set as one batch, ``classification_loss``).

With his settings (seed 42, hidden 50, lr 0.001, 3000 steps) on his ten toy documents the two new
documents of his code come out as Music and Science (``tests/test_bow.py``).  The model is barely
trained by then (loss about 0.50, from 1.06): the different sentences in his printed output
(erratum E3) are not all reproduced, "I love scientific research." comes out Cinema.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from scratchlm.errors import ConfigError, DataError
from scratchlm.models.ngram import words_of


class BagOfWords:
    """Binary bag-of-words features over a fixed vocabulary (index = position in sorted order)."""

    def __init__(self, vocabulary: Sequence[str]):
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}

    @classmethod
    def fit(cls, docs: Sequence[str]) -> BagOfWords:
        """The vocabulary of ``docs``: their lowercased ``\\w+`` words, sorted."""
        _check_docs(docs)
        return cls(sorted({w for doc in docs for w in words_of(doc)}))

    def __len__(self) -> int:
        return len(self.vocabulary)

    def transform(self, docs: Sequence[str]) -> torch.Tensor:
        """A float32 (len(docs), |V|) tensor of 0/1: which vocabulary words each document contains."""
        _check_docs(docs)
        out = torch.zeros(len(docs), len(self.vocabulary))
        for i, doc in enumerate(docs):
            cols = [self.index[w] for w in set(words_of(doc)) if w in self.index]
            out[i, cols] = 1.0
        return out


class BowClassifier(nn.Module):
    """Burkov's two-layer classifier: logits = fc2(relu(fc1(bow)))."""

    def __init__(self, vocab_size: int, num_classes: int, hidden: int = 50):
        super().__init__()
        self.fc1 = nn.Linear(vocab_size, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


@dataclass
class TextClassifier:
    """A trained bag-of-words classifier: features, model and the class label of each output."""

    bow: BagOfWords
    model: BowClassifier
    classes: list
    losses: list[float] = field(default_factory=list)

    @torch.no_grad()
    def predict_proba(self, docs: Sequence[str]) -> torch.Tensor:
        """Softmax class probabilities, (len(docs), len(classes))."""
        return torch.softmax(self.model(self.bow.transform(docs)), dim=-1)

    def predict(self, docs: Sequence[str]) -> list:
        """The most probable class label of each document."""
        return [self.classes[i] for i in self.predict_proba(docs).argmax(dim=-1).tolist()]


def _check_docs(docs: Sequence[str]) -> None:
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise DataError("documents must be a list of strings",
                        "pass e.g. ['Movies are fun.', 'Listen to music.']")


def train_bow_classifier(docs: Sequence[str], labels: Sequence[Hashable], *, hidden: int = 50,
                         lr: float = 1e-3, steps: int = 3000, seed: int = 42) -> TextClassifier:
    """Fit the vocabulary and train a ``BowClassifier`` with Burkov's recipe (full-batch SGD).

    Classes are the sorted distinct labels (Burkov's 1, 2, 3 become outputs 0, 1, 2).  The seed
    is applied right before the model is built, as in his code, inside a forked RNG so the caller's
    global torch RNG is left as it was.
    """
    _check_docs(docs)
    if len(docs) != len(labels):
        raise DataError(f"{len(docs)} documents but {len(labels)} labels", "give one label per document")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to train a classifier, got {classes}",
                        "label the documents with two or more classes")
    if not (isinstance(steps, int) and steps >= 1 and lr > 0 and isinstance(hidden, int) and hidden >= 1):
        raise ConfigError(f"bad training settings (hidden={hidden}, lr={lr}, steps={steps})",
                          "use hidden >= 1, lr > 0 and steps >= 1")
    bow = BagOfWords.fit(docs)
    x = bow.transform(docs)
    y = torch.tensor([classes.index(label) for label in labels])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BowClassifier(len(bow), len(classes), hidden)
    from scratchlm.training import LossEvaluator, TrainConfig, Trainer
    from scratchlm.training.losses import classification_loss

    config = TrainConfig(optimizer="sgd", lr=lr, min_lr=lr, warmup_steps=0, weight_decay=0.0, grad_clip=None,
                         batch_size=len(docs), max_steps=steps, eval_every=0, eval_batches=0, log_every=steps,
                         seed=seed, precision="fp32", device="cpu", progress=False)
    losses: list[float] = []
    trainer = Trainer(model, config, list(zip(x, y, strict=True)), loss_fn=classification_loss,
                      evaluator=LossEvaluator(unit="examples"),
                      callbacks=[lambda t: losses.append(t.last_loss)])
    with torch.random.fork_rng(devices=[]):
        trainer.fit()
    model.eval()
    return TextClassifier(bow, model, classes, losses)
