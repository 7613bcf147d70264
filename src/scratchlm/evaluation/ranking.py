"""Ranking models from pairwise comparisons: online Elo, Bradley–Terry, bootstrap intervals.

A comparison is ``(a, b, winner)`` with winner ``"a"``, ``"b"`` or ``"tie"``; a tie scores ½ to each.

* **Elo** (Burkov §2.6.3): every model starts at ``initial``; in file order, each comparison moves
  both ratings by ``k·(S − E)`` with ``E = 1 / (1 + 10^((R_other − R_self)/400))``, both updates
  from the ratings before the match.  It depends on the order of the comparisons.
* **Bradley–Terry**: ``P(a beats b) = σ(θ_a − θ_b)``; the θ maximise the likelihood of all
  comparisons at once (a tie counts as half a win each way, as Chatbot Arena does), so the order
  does not matter.  On the Elo scale as Chatbot Arena reports it: ``rating = initial +
  400/ln 10 · θ`` with the θ summing to zero, so the ratings average ``initial`` (400 points =
  10:1 odds, like Elo); ``anchor`` shifts them so a named model has a given rating.
* **Regularisation**: a model that never wins (or never loses) has no finite maximum; its θ would
  run to −∞ (+∞).  The fit maximises the log-likelihood minus ``l2/2 · Σθ²`` (a Gaussian prior
  on θ, variance 1/l2), which is finite always and strictly concave, so the answer is unique.
  Its pull is ``l2·θ`` against the data's ``Σ n·p(1−p)·Δθ``, so a small l2 barely moves a model
  with many comparisons and leaves one that lost every match finite, far below the rest
  (docs/evaluation.md gives the sizes; a test holds the first to a rating point).
  ``l2 = 0`` is the plain MLE, refused when it does not exist.
* **Bootstrap**: the comparisons are resampled with replacement ``rounds`` times, Bradley–Terry
  refitted on each, and the 2.5 % and 97.5 % quantiles of each model's rating form its 95 %
  interval (Chatbot Arena's intervals).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scratchlm.errors import ConfigError, DataError

SCALE = 400 / math.log(10)  # natural-log strength → Elo points
WINNERS = {"a": 1.0, "model_a": 1.0, "b": 0.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    score: float  # 1: a won, 0: b won, 0.5: tie


def parse_comparisons(records: Sequence[Mapping[str, Any]], where: str = "comparisons") -> list[Comparison]:
    """Comparisons from JSONL records ``{"a", "b", "winner"}`` (Chatbot Arena's ``model_a``,
    ``model_b``, ``winner`` also); at least two models must appear."""
    out = []
    for i, r in enumerate(records, 1):
        a, b, winner = r.get("a", r.get("model_a")), r.get("b", r.get("model_b")), r.get("winner")
        if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
            raise DataError(f"{where}:{i} needs model names in 'a' and 'b'",
                            'write {"a": NAME, "b": NAME, "winner": "a"|"b"|"tie"} per line')
        if a == b:
            raise DataError(f"{where}:{i} compares {a!r} with itself", "compare two different models")
        if winner not in WINNERS:
            raise DataError(f"{where}:{i} has winner {winner!r}", 'the winner is "a", "b" or "tie"')
        out.append(Comparison(a, b, WINNERS[winner]))
    names = {c.a for c in out} | {c.b for c in out}
    if len(names) < 2:
        raise DataError(f"{where} names {len(names)} model{'s' if len(names) != 1 else ''}"
                        f"{': ' + next(iter(names)) if names else ''}; a ranking needs at least two",
                        "add comparisons between two or more models")
    return out


def elo_expected(r_self: float, r_other: float) -> float:
    return 1 / (1 + 10 ** ((r_other - r_self) / 400))


def elo(comparisons: Sequence[Comparison], k: float = 32, initial: float = 1500) -> dict[str, float]:
    """Online Elo in the given order (both updates of a match use the ratings before it)."""
    ratings: dict[str, float] = {}
    for c in comparisons:
        ra, rb = ratings.setdefault(c.a, initial), ratings.setdefault(c.b, initial)
        ea = elo_expected(ra, rb)
        ratings[c.a] = ra + k * (c.score - ea)
        ratings[c.b] = rb + k * ((1 - c.score) - (1 - ea))
    return ratings


def _pair_counts(comparisons: Sequence[Comparison], index: Mapping[str, int]) -> tuple[np.ndarray, ...]:
    ia = np.array([index[c.a] for c in comparisons])
    ib = np.array([index[c.b] for c in comparisons])
    s = np.array([c.score for c in comparisons])
    return ia, ib, s


def _fit_theta(ia: np.ndarray, ib: np.ndarray, s: np.ndarray, weights: np.ndarray, m: int,
               l2: float) -> np.ndarray:
    """Newton's method on the penalised log-likelihood; θ [m] summing to zero.

    ``weights`` counts each comparison (bootstrap multiplicities).  The Hessian is
    −(Σ n·p(1−p)·(e_a − e_b)(e_a − e_b)ᵀ + l2·I); with l2 = 0 it is singular along the all-ones
    direction, which the zero-sum constraint removes (solved with ones·onesᵀ added).
    """
    theta = np.zeros(m)
    ones = np.ones((m, m)) / m
    for _ in range(100):
        p = 1 / (1 + np.exp(-(theta[ia] - theta[ib])))
        r = weights * (s - p)
        grad = np.bincount(ia, r, m) - np.bincount(ib, r, m) - l2 * theta
        w = weights * p * (1 - p)
        hess = np.zeros((m, m))
        np.add.at(hess, (ia, ia), w)
        np.add.at(hess, (ib, ib), w)
        np.add.at(hess, (ia, ib), -w)
        np.add.at(hess, (ib, ia), -w)
        hess += l2 * np.eye(m)
        step = np.linalg.solve(hess + (ones if l2 == 0 else 0), grad)
        theta = theta + step
        theta -= theta.mean()
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


def _mle_exists(ia: np.ndarray, ib: np.ndarray, s: np.ndarray, m: int) -> bool:
    """The unpenalised maximum is finite iff every model can reach every other through "scored
    against" edges (Zermelo/Ford): the directed graph of (winner → loser, ties both ways) is
    strongly connected."""
    beats = np.zeros((m, m), dtype=bool)
    beats[ia[s > 0], ib[s > 0]] = True
    beats[ib[s < 1], ia[s < 1]] = True
    reach = beats | np.eye(m, dtype=bool)
    for _ in range(m):
        reach = reach | ((reach.astype(int) @ reach.astype(int)) > 0)
    return bool(reach.all())


@dataclass
class Rating:
    model: str
    elo: float
    bt: float
    bt_low: float
    bt_high: float
    wins: int
    losses: int
    ties: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank(comparisons: Sequence[Comparison], *, k: float = 32, initial: float = 1500, l2: float = 0.01,
         bootstrap: int = 1000, seed: int = 0, anchor: tuple[str, float] | None = None) -> list[Rating]:
    """Elo, Bradley–Terry with bootstrap intervals, and win/loss/tie counts; best Bradley–Terry first."""
    if l2 < 0:
        raise ConfigError(f"--l2 must be 0 or more, got {l2}", "pass e.g. --l2 0.01")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be 0 or more, got {bootstrap}", "pass e.g. --bootstrap 1000")
    names = sorted({c.a for c in comparisons} | {c.b for c in comparisons})
    index = {n: i for i, n in enumerate(names)}
    m = len(names)
    ia, ib, s = _pair_counts(comparisons, index)
    if l2 == 0 and not _mle_exists(ia, ib, s, m):
        raise ConfigError("a model never wins or never loses (against some group), so Bradley-Terry has no "
                          "finite maximum-likelihood fit", "leave --l2 at its default (a small prior)")
    # Fit on the distinct (a, b, score) triples, weighted by how often each occurs: a bootstrap
    # sample only changes the weights.
    triples, inverse = np.unique(np.stack([ia, ib, s]), axis=1, return_inverse=True)
    ta, tb, ts = triples[0].astype(int), triples[1].astype(int), triples[2]
    inverse = inverse.reshape(-1)

    def ratings(weights: np.ndarray, penalty: float) -> np.ndarray:
        theta = _fit_theta(ta, tb, ts, weights, m, penalty)
        if anchor is None:
            return initial + SCALE * theta
        return anchor[1] + SCALE * (theta - theta[index[anchor[0]]])

    if anchor is not None and anchor[0] not in index:
        raise ConfigError(f"the anchor model {anchor[0]!r} is not in the comparisons",
                          f"name one of {', '.join(names)}")
    bt = ratings(np.bincount(inverse, minlength=len(ts)).astype(float), l2)
    low, high = bt.copy(), bt.copy()
    if bootstrap:
        rng = np.random.default_rng(seed)
        # A resample may lack the edges that make the plain MLE finite: a vanishing prior keeps it finite.
        samples = np.stack([
            ratings(np.bincount(inverse[rng.integers(0, len(s), len(s))], minlength=len(ts)).astype(float),
                    max(l2, 1e-6))
            for _ in range(bootstrap)])
        low, high = np.quantile(samples, 0.025, axis=0), np.quantile(samples, 0.975, axis=0)
    elo_ratings = elo(comparisons, k, initial)
    wins, losses, ties = np.zeros(m, int), np.zeros(m, int), np.zeros(m, int)
    for c in comparisons:
        a, b = index[c.a], index[c.b]
        if c.score == 0.5:
            ties[a] += 1
            ties[b] += 1
        else:
            wins[a if c.score == 1 else b] += 1
            losses[b if c.score == 1 else a] += 1
    out = [Rating(n, elo_ratings[n], float(bt[i]), float(low[i]), float(high[i]), int(wins[i]),
                  int(losses[i]), int(ties[i])) for i, n in enumerate(names)]
    return sorted(out, key=lambda r: -r.bt)


def plot_ratings(ratings: Sequence[Rating], path: str | Path, title: str = "") -> Path:
    """Bradley–Terry ratings with their bootstrap intervals, and Elo beside them; a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchlm.checkpoint.atomic import save_figure

    order = list(ratings)[::-1]  # best at the top
    y = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(order)), dpi=110)
    bt = np.array([r.bt for r in order])
    err = np.array([[r.bt - r.bt_low for r in order], [r.bt_high - r.bt for r in order]])
    ax.errorbar(bt, y, xerr=err, fmt="o", color="tab:blue", capsize=4, label="Bradley-Terry, 95% interval")
    ax.plot([r.elo for r in order], y, "x", color="tab:orange", label="Elo (file order)")
    ax.set_yticks(y, [r.model for r in order])
    ax.set_xlabel("rating (Elo scale)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize="small", frameon=False)
    if title:
        ax.set_title(title, pad=24)
    return save_figure(fig, path)
