"""ROUGE: equal to Google's rouge-score (to 1e-9) on generated and adversarial texts; Burkov's example."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.evaluation.records import read_predictions
from scratchlm.evaluation.rouge import ROUGE_TYPES, Rouge, f_measure, rouge

BOOK_REFERENCE = "Large language models are very important for text processing."
BOOK_PREDICTION = "Large language models are useful in processing text."

WORDS = ["the", "cat", "sat", "on", "a", "mat", "running", "runs", "ran", "dogs", "dog", "generously",
         "Über", "naïve", "İstanbul", "ß", "1984", "x2", "co-operate", "don't", "CAT", "The"]
SEPARATORS = [" ", "  ", "\n", "\n\n", ". ", ", ", "\t", "—", "-", "'", " \n ", "!?"]
# Words from a small vocabulary (so that n-grams and subsequences repeat), joined by separators that
# include newlines (ROUGE-Lsum sentences, empty and blank lines) and punctuation the tokenizer drops.
texts = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(SEPARATORS)), max_size=30).map(
    lambda parts: "".join(w + s for w, s in parts))
# Anything at all: control characters, combining marks, astral planes, only punctuation.
any_text = st.text(max_size=60)


def rouge_score_scorer(stem: bool):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)


def assert_same(ours, theirs) -> None:
    for name in ROUGE_TYPES:
        for field in ("precision", "recall", "fmeasure"):
            assert getattr(ours[name], field) == pytest.approx(getattr(theirs[name], field), abs=1e-9), (
                name, field)


@settings(max_examples=300, deadline=None)
@given(prediction=st.one_of(texts, any_text), reference=st.one_of(texts, any_text))
def test_equal_to_rouge_score(prediction: str, reference: str) -> None:
    assert_same(Rouge().score(prediction, reference), rouge_score_scorer(False).score(reference, prediction))


@settings(max_examples=150, deadline=None)
@given(prediction=texts, reference=texts)
def test_equal_to_rouge_score_with_stemmer(prediction: str, reference: str) -> None:
    pytest.importorskip("nltk")
    assert_same(Rouge(stem=True).score(prediction, reference),
                rouge_score_scorer(True).score(reference, prediction))


@pytest.mark.parametrize("prediction, reference", [
    ("", ""), ("", "a b"), ("a b", ""), ("...", "!!!"), ("a\n\n\na", "a"), ("\n", "\n"),
    ("a a a a", "a"), ("a b a b a b", "b a b a"), ("x " * 200, "x y " * 100),
    # Several LCS per sentence: the union depends on which one the backtracking takes.
    ("a b c\nb a c\nc b a", "a b c b a\nc a b"), ("A. B! c?\nb, a", "b a\na b"),
])
def test_adversarial_examples(prediction: str, reference: str) -> None:
    assert_same(Rouge().score(prediction, reference), rouge_score_scorer(False).score(reference, prediction))


def test_dataset_average_is_the_mean_of_items() -> None:
    scorer = rouge_score_scorer(False)
    preds, refs = ["a b c", "the cat", "x"], ["a c b", "a cat sat", "y"]
    result = rouge(preds, refs)
    for name in ROUGE_TYPES:
        expected = sum(scorer.score(r, p)[name].fmeasure for p, r in zip(preds, refs, strict=True)) / 3
        assert result.average[name].fmeasure == pytest.approx(expected, abs=1e-12)


def test_burkov_worked_example() -> None:
    """B §2.6.2: ROUGE-1 recall 6/9; ROUGE-L with β = 8: R = 5/9, P = 5/8, F = 0.556507."""
    result = rouge([BOOK_PREDICTION], [BOOK_REFERENCE], beta=8, micro=True)
    assert result.average["rouge1"].recall == pytest.approx(6 / 9, abs=1e-12)
    lcs = result.average["rougeL"]
    assert (lcs.recall, lcs.precision) == (pytest.approx(5 / 9), pytest.approx(5 / 8))
    assert lcs.fmeasure == pytest.approx(0.556507, abs=1e-6)


def test_micro_average_pools_counts() -> None:
    """Burkov's ROUGE-1 over a dataset: total matches / total reference length (not a mean of ratios)."""
    result = rouge(["a b", "c"], ["a b x y", "c"], micro=True)
    assert result.average["rouge1"].recall == pytest.approx(3 / 5)
    assert rouge(["a b", "c"], ["a b x y", "c"]).average["rouge1"].recall == pytest.approx((0.5 + 1) / 2)


def test_f_measure_beta() -> None:
    assert f_measure(0.0, 0.0, 8) == 0.0
    assert f_measure(0.5, 0.5, 8) == pytest.approx(0.5)
    assert f_measure(1.0, 0.5, 1e6) == pytest.approx(0.5)  # β → ∞: recall


def test_cli_book_example(tmp_path, run_cli) -> None:
    path = tmp_path / "responses.jsonl"
    record = {"instruction": "x", "output": BOOK_REFERENCE, "response": BOOK_PREDICTION}
    path.write_text(json.dumps(record) + "\n")
    code, out, _ = run_cli("eval", "rouge", "--predictions", path, "--beta", "8", "--recall", "--json",
                           "--out", tmp_path / "items.jsonl")
    assert code == 0
    report = json.loads(out)
    assert report["n"] == 1 and set(report) == {*ROUGE_TYPES, "n"}
    assert report["rougeL"]["fmeasure"] == pytest.approx(0.556507, abs=1e-6)
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert items[0]["rouge1"]["recall"] == pytest.approx(6 / 9)
    code, out, _ = run_cli("eval", "rouge", "--predictions", path)
    assert code == 0 and "rougeLsum" in out


def test_cli_text_files(tmp_path, run_cli) -> None:
    (tmp_path / "p.txt").write_text("a b\nc d\n")
    (tmp_path / "r.txt").write_text("a b\nc e\n")
    code, out, _ = run_cli("eval", "rouge", "--predictions", tmp_path / "p.txt", "--references",
                           tmp_path / "r.txt", "--json")
    assert code == 0 and json.loads(out)["rouge1"]["recall"] == pytest.approx(0.75)


@pytest.mark.parametrize("case", ["lengths", "no_reference", "not_jsonl", "bad_json", "beta"])
def test_cli_bad_inputs(tmp_path, run_cli, case) -> None:
    p, r = tmp_path / "p.txt", tmp_path / "r.txt"
    p.write_text("a\nb\nc\n")
    r.write_text("a\nb\n")
    args = {"lengths": ["--predictions", p, "--references", r],
            "no_reference": ["--predictions", tmp_path / "x.jsonl"],
            "not_jsonl": ["--predictions", p],
            "bad_json": ["--predictions", tmp_path / "bad.jsonl"],
            "beta": ["--predictions", tmp_path / "x.jsonl", "--beta", "0"]}[case]
    (tmp_path / "x.jsonl").write_text('{"response": "a", "reference": "a"}\n{"response": "b"}\n'
                                      if case == "no_reference" else '{"response": "a", "reference": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"response": "a", "reference": "a"}\n{"response": \n')
    code, out, err = run_cli("eval", "rouge", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_read_predictions_jsonl_pair_files(tmp_path) -> None:
    (tmp_path / "p.jsonl").write_text('{"response": "x"}\n')
    (tmp_path / "r.jsonl").write_text('{"output": "y"}\n')
    assert read_predictions(tmp_path / "p.jsonl", tmp_path / "r.jsonl") == (["x"], ["y"])


def test_eval_help_stays_light() -> None:
    """Building the eval parser (every subcommand's --help) reads the evaluators' docstrings without
    importing them (their torch, numpy and matplotlib load when a command runs)."""
    import subprocess
    import sys

    code = ("import sys; from scratchlm.cli import build_parser; build_parser('eval'); "
            "names = ('rouge', 'mc', 'ranking', 'judge', 'report'); "
            "loaded = [n for n in names if 'scratchlm.evaluation.' + n in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
