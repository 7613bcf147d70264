"""``eval report``: one page from a run's files; HTML and Markdown; rendered by headless Chromium."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from scratchlm.evaluation.judge import judge_all, parse_score, score_requests
from scratchlm.evaluation.judge import read_entries as read_judge_entries
from scratchlm.evaluation.report import build_sections, render_html


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A finetuning run's files, as the other commands write them."""
    run = tmp_path / "run"
    run.mkdir()
    records = []
    for step in range(0, 101, 10):
        records.append({"kind": "train", "step": step, "loss": 3 - step / 50, "lr": 1e-3})
        if step % 20 == 0:
            records.append({"kind": "eval", "step": step, "train_loss": 3 - step / 50,
                            "val_loss": 3.1 - step / 60, "val_accuracy": 0.4 + step / 300})
    jsonl(run / "metrics.jsonl", records)
    (run / "results.json").write_text(json.dumps({"val_loss": 1.4, "val_accuracy": 0.73, "steps": 100}))
    rng = random.Random(0)
    words = "the a cat dog sat ran on mat <b>bold</b> & | pipe".split()
    responses = [{"instruction": f"Say something {i}", "input": "",
                  "output": " ".join(rng.choices(words, k=8)), "response": " ".join(rng.choices(words, k=8))}
                 for i in range(12)]
    jsonl(run / "test_responses.jsonl", responses)
    entries = read_judge_entries(responses, "r")
    replies = iter(["80", "75", "not sure", "90", "60", "70", "85", "95", "40", "55", "65", "50"])
    judge_all(lambda prompt: next(replies), score_requests(entries), run / "judge_scores.jsonl",
              parse=parse_score)
    comparisons = [{"a": "base", "b": "tuned", "winner": rng.choice(["a", "b", "b", "tie"])}
                   for _ in range(30)]
    comparisons += [{"a": "tuned", "b": "other", "winner": rng.choice(["a", "b"])} for _ in range(10)]
    jsonl(run / "comparisons.jsonl", comparisons)
    return run


def test_sections_from_a_run_dir(run_dir) -> None:
    sections = build_sections([run_dir], bootstrap=50)
    titles = [s.title for s in sections]
    assert titles == ["Training curves", "Final results", "Responses: ROUGE", "Judge scores", "Ranking"]
    curves, _, rouge, judge, ranking = sections
    assert [f.title for f in curves.figures] == ["loss", "accuracy"]
    assert all(f.png.startswith(b"\x89PNG") for s in sections for f in s.figures)
    assert len(rouge.samples) == 5 and rouge.tables[0].rows[0][0] == "rouge1"
    assert "11 parsed replies; unparsed: 1." in judge.text[0]
    assert judge.tables[0].rows == [["2", "not sure"]]
    assert {row[0] for row in ranking.tables[0].rows} == {"base", "tuned", "other"}


def test_html_is_escaped_and_self_contained(run_dir, tmp_path, run_cli) -> None:
    out = tmp_path / "report.html"
    code, stdout, err = run_cli("eval", "report", run_dir, "--out", out, "--bootstrap", "50")
    assert code == 0, err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 4
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_markdown(run_dir, tmp_path, run_cli) -> None:
    out = tmp_path / "report.md"
    code, _, err = run_cli("eval", "report", run_dir / "test_responses.jsonl", run_dir / "comparisons.jsonl",
                           "--out", out, "--bootstrap", "20")
    assert code == 0, err
    text = out.read_text()
    assert "## Ranking" in text and "![ratings](report_files/figure1.png)" in text
    assert (tmp_path / "report_files" / "figure1.png").read_bytes().startswith(b"\x89PNG")
    assert "\\|" in text  # a pipe in a response does not break the table


@pytest.mark.parametrize("case", ["missing", "unknown", "suffix", "empty_dir", "empty_file"])
def test_bad_inputs(tmp_path, run_cli, case) -> None:
    (tmp_path / "notes.jsonl").write_text('{"x": 1}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "comparisons.jsonl").write_text("")
    path, out = {"missing": (tmp_path / "nope", "r.html"), "unknown": (tmp_path / "notes.jsonl", "r.html"),
                 "suffix": (tmp_path / "notes.jsonl", "r.pdf"), "empty_dir": (tmp_path / "empty", "r.html"),
                 "empty_file": (tmp_path / "comparisons.jsonl", "r.html")}[case]
    code, stdout, err = run_cli("eval", "report", path, "--out", tmp_path / out)
    assert code == 2 and stdout == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium on this machine (apt-get install chromium) to render the report")


def test_renders_in_headless_chromium(run_dir, tmp_path) -> None:
    """A real browser loads the page: the DOM has every section, and the screenshot is not blank."""
    browser = chromium()
    sections = build_sections([run_dir], bootstrap=50)
    page = tmp_path / "report.html"
    page.write_text(render_html(sections, "test report"))
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for title in ("Training curves", "Responses: ROUGE", "Judge scores", "Ranking", "Sample responses"):
        assert title in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # text, tables and figures drawn, not a blank page
