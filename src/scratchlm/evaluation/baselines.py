"""Reference baselines that a finetuned model has to beat: bag of words + logistic regression.

Burkov §5.3.1 starts every classification task with the cheapest strong model: scikit-learn's
``CountVectorizer(max_features=10_000, binary=True)`` (lowercased words of 2+ characters, the
10,000 most frequent, 0/1 presence) feeding ``LogisticRegression(random_state=42, max_iter=1000)``,
on a shuffled split (``random.seed(42)``, then the last ``test_ratio`` of the rows is the test set).
If a language model cannot beat that, its finetuning is not worth the compute.

``sms_spam_baseline(path)`` runs it on the SMS Spam Collection (``label<TAB>text`` per line, the
dataset of Raschka's chapter 6).  scikit-learn is a development dependency, imported on first use.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from scratchlm.errors import ConfigError, DataError


def read_labelled_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a ``label<TAB>text`` file (``finetune.data.read_labelled``, which also
    reads CSV and JSONL): a malformed row is a ``DataError`` naming its line number."""
    from scratchlm.finetune.data import read_labelled

    examples = read_labelled(path)
    return [x.text for x in examples], [x.label for x in examples]


def shuffled_split(texts: Sequence[str], labels: Sequence, test_ratio: float = 0.1, seed: int = 42):
    """Burkov's split: shuffle the rows with ``random.seed(seed)``, the last ``test_ratio`` is test.

    Returns ``(train_texts, train_labels, test_texts, test_labels)``.
    """
    if not 0 < test_ratio < 1:
        raise ConfigError(f"test_ratio must be between 0 and 1, got {test_ratio}", "use e.g. 0.1")
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels", "give one label per text")
    rows = list(zip(texts, labels, strict=True))
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * (1 - test_ratio))
    if cut == 0 or cut == len(rows):
        raise DataError(f"{len(rows)} rows leave an empty train or test set at test_ratio={test_ratio}",
                        "use more rows or another test_ratio")
    train, test = rows[:cut], rows[cut:]
    return [t for t, _ in train], [y for _, y in train], [t for t, _ in test], [y for _, y in test]


@dataclass
class BaselineResult:
    """Accuracies of a fitted baseline on its own train split and on the held-out test split."""

    train_accuracy: float
    test_accuracy: float
    n_train: int
    n_test: int
    n_features: int
    classes: list

    def __str__(self) -> str:
        return (f"BoW + logistic regression: train accuracy {self.train_accuracy:.4f} ({self.n_train} rows), "
                f"test accuracy {self.test_accuracy:.4f} ({self.n_test} rows), {self.n_features} features")


def bow_logreg_baseline(texts: Sequence[str], labels: Sequence, *, max_features: int = 10_000,
                        binary: bool = True, ngram_range: tuple[int, int] = (1, 1), test_ratio: float = 0.1,
                        seed: int = 42) -> BaselineResult:
    """Burkov §5.3.1's baseline on any labelled texts; see the module docstring."""
    try:
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ConfigError("scikit-learn is not installed", "pip install scikit-learn") from None
    x_train, y_train, x_test, y_test = shuffled_split(texts, labels, test_ratio, seed)
    if len(set(y_train)) < 2:
        raise DataError(f"the training split has only the class {y_train[0]!r}",
                        "use data with at least two classes")
    vectorizer = CountVectorizer(max_features=max_features, binary=binary, ngram_range=ngram_range)
    try:
        features = vectorizer.fit_transform(x_train)
    except ValueError as err:  # e.g. no words at all
        raise DataError(f"cannot build bag-of-words features: {err}",
                        "check that the texts contain words") from None
    model = LogisticRegression(random_state=42, max_iter=1000)
    model.fit(features, y_train)
    train_acc = float((model.predict(features) == y_train).mean())
    test_acc = float((model.predict(vectorizer.transform(x_test)) == y_test).mean())
    return BaselineResult(train_acc, test_acc, len(x_train), len(x_test), len(vectorizer.vocabulary_),
                          [c.item() if hasattr(c, "item") else c for c in model.classes_])


def sms_spam_baseline(path: str | Path, **kwargs) -> BaselineResult:
    """The baseline on the SMS Spam Collection (``ham``/``spam`` + TAB + message per line)."""
    texts, labels = read_labelled_tsv(path)
    return bow_logreg_baseline(texts, labels, **kwargs)
