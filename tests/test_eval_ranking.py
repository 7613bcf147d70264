"""Elo (Burkov's worked example, exactly), Bradley–Terry (recovers simulated strengths, equals an
unpenalised logistic regression, finite when a model never wins), bootstrap intervals, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scratchlm.errors import DataError
from scratchlm.evaluation.ranking import SCALE, Comparison, elo, parse_comparisons, rank

BOOK = [Comparison("LM1", "LM2", 1.0), Comparison("LM3", "LM1", 1.0), Comparison("LM3", "LM2", 1.0)]


def simulate(strengths: dict[str, float], n: int, seed: int, tie_rate: float = 0.0) -> list[Comparison]:
    rng = np.random.default_rng(seed)
    names = list(strengths)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), 2, replace=False)
        p = 1 / (1 + 10 ** ((strengths[names[b]] - strengths[names[a]]) / 400))
        u = rng.random()
        score = 0.5 if u < tie_rate else float(rng.random() < p)
        out.append(Comparison(names[a], names[b], score))
    return out


def test_elo_book_example() -> None:
    """B §2.6.3: start 1500, k = 32: LM1 1499.263693, LM2 1469.503117, LM3 1531.233190."""
    ratings = elo(BOOK, k=32, initial=1500)
    assert ratings["LM1"] == pytest.approx(1499.263693, abs=1e-6)
    assert ratings["LM2"] == pytest.approx(1469.503117, abs=1e-6)
    assert ratings["LM3"] == pytest.approx(1531.233190, abs=1e-6)
    assert {k: round(v) for k, v in ratings.items()} == {"LM1": 1499, "LM2": 1470, "LM3": 1531}


def test_elo_tie_and_order_dependence() -> None:
    assert elo([Comparison("x", "y", 0.5)]) == {"x": 1500, "y": 1500}
    forward = elo([Comparison("x", "y", 1.0), Comparison("y", "x", 1.0)])
    backward = elo([Comparison("y", "x", 1.0), Comparison("x", "y", 1.0)])
    assert forward["x"] != backward["x"]  # Elo depends on the order; Bradley-Terry does not


def test_bradley_terry_recovers_strengths() -> None:
    true = {"a": 0.0, "b": 120.0, "c": -200.0, "d": 300.0}
    ratings = rank(simulate(true, 8000, seed=1), bootstrap=200, seed=0)
    mean = sum(true.values()) / len(true)
    inside = 0
    for r in ratings:
        expected = 1500 + true[r.model] - mean
        assert abs(r.bt - expected) < 25
        inside += r.bt_low <= expected <= r.bt_high
        assert r.bt_low < r.bt < r.bt_high
    assert inside >= 3  # 95% intervals
    assert [r.model for r in ratings] == ["d", "b", "a", "c"]
    assert sum(r.bt for r in ratings) / len(ratings) == pytest.approx(1500)


def test_bradley_terry_order_independent_and_equal_to_logistic_regression() -> None:
    """l2 = 0 is the maximum-likelihood fit Chatbot Arena computes with scikit-learn (ties as half a win)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    comps = simulate({"a": 0.0, "b": 80.0, "c": -150.0}, 600, seed=3, tie_rate=0.2)
    ours = {r.model: r.bt for r in rank(comps, l2=0, bootstrap=0)}
    shuffled = {r.model: r.bt for r in rank(comps[::-1], l2=0, bootstrap=0)}
    names = sorted(ours)
    x, y, w = [], [], []
    for c in comps:
        row = np.zeros(len(names))
        row[names.index(c.a)], row[names.index(c.b)] = math.log(10), -math.log(10)
        for outcome, weight in ((1, c.score), (0, 1 - c.score)):
            if weight:
                x.append(row), y.append(outcome), w.append(weight)
    lr = linear_model.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-10, max_iter=10_000)
    lr.fit(np.array(x), np.array(y), sample_weight=np.array(w))
    theirs = 400 * lr.coef_[0]
    theirs += 1500 - theirs.mean()
    for i, name in enumerate(names):
        assert ours[name] == pytest.approx(theirs[i], abs=1e-3)
        assert shuffled[name] == pytest.approx(ours[name], abs=1e-9)


def test_never_wins_is_finite_and_last() -> None:
    comps = [Comparison("loser", "x", 0.0) for _ in range(10)] + simulate({"x": 0, "y": 0}, 50, seed=0)
    ratings = rank(comps, bootstrap=50)
    assert [r.model for r in ratings][-1] == "loser"
    assert all(math.isfinite(v) for r in ratings for v in (r.bt, r.bt_low, r.bt_high))
    assert ratings[-1].bt < 1000  # far below, not minus infinity
    with pytest.raises(Exception, match="never wins or never loses"):
        rank(comps, l2=0)


def test_regulariser_barely_moves_well_determined_ratings() -> None:
    comps = simulate({"a": 0.0, "b": 100.0, "c": -100.0}, 3000, seed=5)
    plain = {r.model: r.bt for r in rank(comps, l2=0, bootstrap=0)}
    for r in rank(comps, bootstrap=0):
        assert r.bt == pytest.approx(plain[r.model], abs=1.0)


def test_anchor() -> None:
    ratings = {r.model: r for r in rank(BOOK * 3 + [Comparison("LM2", "LM3", 1.0)], anchor=("LM1", 1000),
                                        bootstrap=20)}
    assert ratings["LM1"].bt == pytest.approx(1000)


def test_counts() -> None:
    ratings = {r.model: r for r in rank(BOOK + [Comparison("LM1", "LM2", 0.5)], bootstrap=0)}
    assert (ratings["LM1"].wins, ratings["LM1"].losses, ratings["LM1"].ties) == (1, 1, 1)
    assert (ratings["LM3"].wins, ratings["LM3"].losses, ratings["LM3"].ties) == (2, 0, 0)


@pytest.mark.parametrize("records, message", [
    ([{"a": "x", "b": "y", "winner": "x"}], "winner"),
    ([{"a": "x", "b": "x", "winner": "a"}], "itself"),
    ([{"a": "x", "winner": "a"}], "'a' and 'b'"),
    ([], "names 0 models"),
])
def test_parse_errors(records, message) -> None:
    with pytest.raises(DataError, match=message):
        parse_comparisons(records)


def test_parse_arena_fields() -> None:
    parsed = parse_comparisons([{"model_a": "x", "model_b": "y", "winner": "model_b"},
                                {"a": "x", "b": "y", "winner": "tie (bothbad)"}])
    assert [c.score for c in parsed] == [0.0, 0.5]


def test_cli_book_example_and_plot(tmp_path, run_cli) -> None:
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps({"a": c.a, "b": c.b, "winner": "a"}) + "\n" for c in BOOK))
    code, out, _ = run_cli("eval", "ranking", "--comparisons", path, "--json", "--bootstrap", "50")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    assert set(rows["LM1"]) == {"model", "elo", "bt", "bt_low", "bt_high", "wins", "losses", "ties"}
    assert rows["LM2"]["elo"] == pytest.approx(1469.503117, abs=1e-6)
    assert [r["model"] for r in json.loads(out)] == ["LM3", "LM1", "LM2"]
    assert (tmp_path / "ratings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run_cli("eval", "ranking", "--comparisons", path, "--plot", "none", "--bootstrap", "10")
    assert code == 0 and "LM3" in out.splitlines()[2]


@pytest.mark.parametrize("case", ["one_model", "bad_anchor", "anchor_syntax", "missing"])
def test_cli_bad_inputs(tmp_path, run_cli, case) -> None:
    path = tmp_path / "c.jsonl"
    lines = ([{"a": "x", "b": "x2", "winner": "a"}] if case != "one_model" else [])
    lines += [{"a": "x", "b": "y", "winner": "tie"}] if case != "one_model" else []
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) if lines else "")
    if case == "one_model":
        path.write_text('{"a": "x", "b": "x", "winner": "tie"}\n')
    extra = {"bad_anchor": ["--anchor", "nope=1000"], "anchor_syntax": ["--anchor", "x=high"]}.get(case, [])
    target = tmp_path / "absent.jsonl" if case == "missing" else path
    code, out, err = run_cli("eval", "ranking", "--comparisons", target, "--plot", "none", *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cli_only_one_model_named(tmp_path, run_cli) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("")
    code, _, err = run_cli("eval", "ranking", "--comparisons", path, "--plot", "none")
    assert code == 2 and "names 0 models" in err


def test_scale() -> None:
    assert SCALE * math.log(10) == pytest.approx(400)
