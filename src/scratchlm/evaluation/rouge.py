"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum: what Google's ``rouge-score`` computes, and Burkov's variant.

Tokens (``rouge-score``'s default tokenizer, after Lin's ROUGE-1.5.5): lowercase, every run of
characters outside ``[a-z0-9]`` is a separator, and (``stem=True``) words longer than three
characters go through the Porter stemmer.

Each score is a count of matches over the two lengths:

* ROUGE-N: n-gram matches, clipped (an n-gram counts as often as it appears in both), over the
  n-gram counts of reference (recall) and prediction (precision);
* ROUGE-L: the length of a longest common subsequence of the two token lists;
* ROUGE-Lsum: the summary-level LCS of Lin (2004) §3.2: sentences are the text's lines; each
  reference sentence's hits are the union of its LCS with every prediction sentence, each token
  counted at most as often as both texts hold it (as ROUGE-1.5.5 and ``rouge-score`` do).  Which
  LCS is taken when several exist changes the union, so the backtracking prefers the same one as
  they do: on a tie it moves up the reference before left along the prediction.

F-measure: ``F_β = (1 + β²)·P·R / (R + β²·P)``, 0 when P + R = 0; β = 1 is ``rouge-score``'s F1;
Burkov (§2.6.2, after Lin) uses β = 8 for ROUGE-L, which weighs recall far above precision.

Averages over a dataset are the mean of the per-item scores (``rouge-score``'s aggregate), or
with ``micro=True`` Burkov's dataset-level definition: total matches over total reference
(recall) and prediction (precision) lengths, and F from those.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scratchlm.errors import ConfigError, DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_TOKEN = re.compile(r"^[a-z0-9]+$")


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    fmeasure: float

    def to_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "fmeasure": self.fmeasure}


@dataclass(frozen=True)
class Overlap:
    """Matches of one ROUGE type for one pair, and the lengths they are divided by."""

    hits: int
    reference: int  # reference n-grams / tokens (the recall denominator)
    prediction: int  # prediction n-grams / tokens (the precision denominator)

    def score(self, beta: float = 1.0) -> Score:
        precision = self.hits / max(self.prediction, 1)
        recall = self.hits / max(self.reference, 1)
        return Score(precision, recall, f_measure(precision, recall, beta))


def f_measure(precision: float, recall: float, beta: float = 1.0) -> float:
    if precision + recall <= 0:
        return 0.0
    if beta == 1.0:  # rouge-score's expression, operation for operation (parity to the last bit)
        return 2 * precision * recall / (precision + recall)
    b2 = beta * beta
    return (1 + b2) * precision * recall / (recall + b2 * precision)


class Tokenizer:
    """``rouge-score``'s default tokenizer; ``stem`` uses NLTK's Porter stemmer (an optional import)."""

    def __init__(self, stem: bool = False):
        self._stem = None
        if stem:
            try:
                from nltk.stem.porter import PorterStemmer
            except ImportError:
                raise ConfigError("--stemmer needs NLTK's Porter stemmer, and nltk is not installed",
                                  "pip install nltk, or leave out --stemmer") from None
            self._stem = PorterStemmer().stem

    def __call__(self, text: str) -> list[str]:
        tokens = _SPACES.split(_NON_ALPHANUMERIC.sub(" ", text.lower()))
        if self._stem is not None:
            tokens = [self._stem(t) if len(t) > 3 else t for t in tokens]
        return [t for t in tokens if _TOKEN.match(t)]


def ngram_overlap(reference: Sequence[str], prediction: Sequence[str], n: int) -> Overlap:
    ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
    pred = Counter(tuple(prediction[i:i + n]) for i in range(len(prediction) - n + 1))
    hits = sum(min(count, pred[gram]) for gram, count in ref.items())
    return Overlap(hits, sum(ref.values()), sum(pred.values()))


def lcs_table(a: Sequence[str], b: Sequence[str]) -> list[list[int]]:
    """``table[i][j]``: LCS length of ``a[:i]`` and ``b[:j]``."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        row, above = table[i], table[i - 1]
        ai = a[i - 1]
        for j in range(1, len(b) + 1):
            row[j] = above[j - 1] + 1 if ai == b[j - 1] else max(above[j], row[j - 1])
    return table


def lcs_positions(reference: Sequence[str], prediction: Sequence[str]) -> list[int]:
    """Positions in ``reference`` of one LCS (on a tie the backtracking moves up ``reference``)."""
    table = lcs_table(reference, prediction)
    i, j, out = len(reference), len(prediction), []
    while i > 0 and j > 0:
        if reference[i - 1] == prediction[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def lcs_overlap(reference: Sequence[str], prediction: Sequence[str]) -> Overlap:
    hits = lcs_table(reference, prediction)[-1][-1] if reference and prediction else 0
    return Overlap(hits, len(reference), len(prediction))


def summary_lcs_overlap(reference: Sequence[Sequence[str]], prediction: Sequence[Sequence[str]]) -> Overlap:
    """ROUGE-Lsum over sentences (lists of tokens), union LCS without double counting."""
    m, n = sum(map(len, reference)), sum(map(len, prediction))
    if not m or not n:
        return Overlap(0, m, n)
    left_ref = Counter(t for sentence in reference for t in sentence)
    left_pred = Counter(t for sentence in prediction for t in sentence)
    hits = 0
    for sentence in reference:
        union = sorted(set().union(*(lcs_positions(sentence, p) for p in prediction)))
        for token in (sentence[i] for i in union):
            if left_pred[token] > 0 and left_ref[token] > 0:
                hits += 1
                left_pred[token] -= 1
                left_ref[token] -= 1
    return Overlap(hits, m, n)


class Rouge:
    """Scores prediction/reference pairs; ``overlaps`` keeps the counts, ``score`` the ratios."""

    def __init__(self, stem: bool = False, beta: float = 1.0):
        if not beta > 0:
            raise ConfigError(f"--beta must be positive, got {beta}", "pass e.g. --beta 1 (F1) or --beta 8")
        self.tokenize = Tokenizer(stem)
        self.beta = beta

    def overlaps(self, prediction: str, reference: str) -> dict[str, Overlap]:
        ref, pred = self.tokenize(reference), self.tokenize(prediction)
        sentences = [[self.tokenize(s) for s in text.split("\n") if s] for text in (reference, prediction)]
        return {"rouge1": ngram_overlap(ref, pred, 1), "rouge2": ngram_overlap(ref, pred, 2),
                "rougeL": lcs_overlap(ref, pred), "rougeLsum": summary_lcs_overlap(*sentences)}

    def score(self, prediction: str, reference: str) -> dict[str, Score]:
        return {name: o.score(self.beta) for name, o in self.overlaps(prediction, reference).items()}


@dataclass
class RougeResult:
    """Per-item scores and the averages of a dataset."""

    items: list[dict[str, Score]]
    average: dict[str, Score]

    def to_dict(self) -> dict[str, Any]:
        return {**{name: s.to_dict() for name, s in self.average.items()}, "n": len(self.items)}


def rouge(predictions: Sequence[str], references: Sequence[str], *, stem: bool = False, beta: float = 1.0,
          micro: bool = False) -> RougeResult:
    """ROUGE of each pair and the dataset's average (mean of the items, or ``micro``: pooled counts)."""
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references",
                        "give one reference per prediction, in the same order")
    if not predictions:
        raise DataError("there are no predictions to score", "pass a file with at least one item")
    scorer = Rouge(stem, beta)
    overlaps = [scorer.overlaps(p, r) for p, r in zip(predictions, references, strict=True)]
    items = [{name: o.score(beta) for name, o in item.items()} for item in overlaps]
    average = {}
    for name in ROUGE_TYPES:
        if micro:
            pooled = Overlap(*(sum(getattr(item[name], f) for item in overlaps)
                               for f in ("hits", "reference", "prediction")))
            average[name] = pooled.score(beta)
        else:
            scores = [item[name] for item in items]
            average[name] = Score(*(sum(getattr(s, f) for s in scores) / len(scores)
                                    for f in ("precision", "recall", "fmeasure")))
    return RougeResult(items, average)
