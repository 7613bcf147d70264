"""One page a person reads: a run's curves, ROUGE, judge scores, rankings and sample responses.

``build_report(paths)`` takes run directories and files and recognises what each holds:

* ``metrics.jsonl`` (a run's log): the loss curves (``training.logging.plot_losses``) and, when the
  evaluations logged any ``*accuracy`` metric, an accuracy curve;
* responses (``test_responses.jsonl``, or any JSONL with ``response`` and ``output``/``reference``):
  the ROUGE table (``evaluation.rouge``) and a sample of responses beside their references;
* judge scores (``judge_scores.jsonl`` from ``eval judge``): a histogram, the mean and its 95 %
  interval, the unparsed replies counted;
* comparisons (``comparisons.jsonl``, ``{"a", "b", "winner"}``): the ranking table and plot
  (``evaluation.ranking``);
* ``results.json`` (a run's final metrics): a table.

A run directory contributes each of those files it has.  The page is one self-contained HTML file
(figures inlined as PNG data URIs, no scripts, no network) or Markdown with the figures written
beside it; both are written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import ConfigError, DataError
from scratchlm.evaluation.records import REFERENCE_FIELDS, RESPONSE_FIELDS, read_jsonl

RUN_FILES = ("metrics.jsonl", "results.json", "test_responses.jsonl", "judge_scores.jsonl",
             "comparisons.jsonl")


@dataclass
class Figure:
    title: str
    png: bytes


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    source: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)  # instruction, reference, response


def _png(draw: Callable[[Path], Any]) -> bytes:
    """Run a plotting function that writes a PNG to a path; return the bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure.png"
        draw(path)
        return path.read_bytes()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    from scratchlm.checkpoint.atomic import save_figure

    save_figure(fig, path)


# ----- what each kind of file becomes ---------------------------------------------------------

def metrics_section(path: Path) -> Section:
    from scratchlm.training.logging import plot_losses, read_metrics

    records = read_metrics(path)
    section = Section("Training curves", str(path))
    section.figures.append(Figure("loss", _png(lambda p: plot_losses(records, p, title=path.parent.name))))
    evals = [r for r in records if r.get("kind") == "eval"]
    keys = sorted({k for r in evals for k in r if k.endswith("accuracy") and isinstance(r[k], (int, float))})
    if keys:
        def draw(p: Path) -> None:
            fig, ax = _pyplot().subplots(figsize=(7, 4.2), dpi=110)
            for key in keys:
                points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
                ax.plot(*zip(*points, strict=True), "o-", ms=3, label=key)
            ax.set_xlabel("step")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
            _save(fig, p)

        section.figures.append(Figure("accuracy", _png(draw)))
    last = next((r for r in reversed(evals)), None)
    if last:
        shown = {k: v for k, v in last.items() if isinstance(v, (int, float)) and k != "elapsed"}
        section.tables.append(Table(["last evaluation", "value"], [[k, _fmt(v)] for k, v in shown.items()]))
    return section


def results_section(path: Path) -> Section:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON ({e.msg})", "pass a results.json written by a run") from None
    rows = [[k, _fmt(v)] for k, v in results.items() if isinstance(v, (int, float, str))]
    return Section("Final results", str(path), tables=[Table(["metric", "value"], rows)])


def responses_section(path: Path, records: list[dict[str, Any]], samples: int) -> Section:
    from scratchlm.evaluation.rouge import ROUGE_TYPES, rouge

    predictions = [str(next(r[k] for k in RESPONSE_FIELDS if k in r)) for r in records]
    references = [str(next(r[k] for k in REFERENCE_FIELDS if k in r)) for r in records]
    result = rouge(predictions, references)
    rows = [[name, *(f"{getattr(result.average[name], f):.4f}" for f in ("precision", "recall", "fmeasure"))]
            for name in ROUGE_TYPES]
    section = Section("Responses: ROUGE", str(path),
                      text=[f"{len(records)} responses against their references (rouge-score's definitions, "
                            "mean of per-item scores)."],
                      tables=[Table(["", "precision", "recall", "F1"], rows)])
    for r, p, ref in list(zip(records, predictions, references, strict=True))[:samples]:
        instruction = str(r.get("instruction", "")) + (f"\n\n{r['input']}" if r.get("input") else "")
        section.samples.append({"instruction": instruction, "reference": ref, "response": p})
    return section


def judge_section(path: Path, records: list[dict[str, Any]]) -> Section:
    from scratchlm.evaluation.judge import summarise_scores

    summary = summarise_scores(records)
    low, high = summary.interval
    section = Section("Judge scores", str(path))
    section.text.append(summary.describe()[0].upper() + summary.describe()[1:] + ".")
    if summary.scores:
        def draw(p: Path) -> None:
            fig, ax = _pyplot().subplots(figsize=(7, 3.6), dpi=110)
            ax.hist(summary.scores, bins=range(0, 105, 5), color="tab:blue", edgecolor="white")
            ax.axvline(summary.mean, color="tab:red", label=f"mean {summary.mean:.1f}")
            if low == low:  # not NaN
                ax.axvspan(low, high, color="tab:red", alpha=0.15, label="95% interval")
            ax.set_xlabel("score (0-100)")
            ax.set_ylabel("responses")
            ax.legend()
            _save(fig, p)

        section.figures.append(Figure("judge score histogram", _png(draw)))
    if summary.unparsed:
        section.tables.append(Table(["item", "unparsed reply"],
                                    [[str(u["index"]), u["reply"][:200]] for u in summary.unparsed[:20]]))
    return section


def ranking_section(path: Path, records: list[dict[str, Any]], bootstrap: int, seed: int) -> Section:
    from scratchlm.evaluation.ranking import parse_comparisons, plot_ratings, rank

    comparisons = parse_comparisons(records, str(path))
    ratings = rank(comparisons, bootstrap=bootstrap, seed=seed)
    rows = [[r.model, f"{r.bt:.1f}", f"{r.bt_low:.1f} to {r.bt_high:.1f}", f"{r.elo:.1f}", str(r.wins),
             str(r.losses), str(r.ties)] for r in ratings]
    return Section("Ranking", str(path),
                   text=[f"{len(comparisons)} comparisons; Bradley-Terry on the Elo scale with 95% intervals "
                         f"from {bootstrap} bootstrap rounds; Elo in file order (k = 32)."],
                   tables=[Table(["model", "Bradley-Terry", "95% interval", "Elo", "wins", "losses", "ties"],
                                 rows)],
                   figures=[Figure("ratings", _png(lambda p: plot_ratings(ratings, p)))])


def classify(path: Path) -> str | None:
    """What a JSONL file holds, by its name or its first record."""
    name = path.name
    if name == "metrics.jsonl":
        return "metrics"
    if name == "results.json":
        return "results"
    if path.suffix != ".jsonl":
        return None
    records = read_jsonl(path)
    first = records[0] if records else {}
    if "winner" in first:
        return "comparisons"
    if "prompt_sha" in first and first.get("order") is None:
        return "judge"
    if any(k in first for k in RESPONSE_FIELDS) and any(k in first for k in REFERENCE_FIELDS):
        return "responses"
    if "kind" in first and "step" in first:
        return "metrics"
    return None


def build_sections(paths: Sequence[str | Path], *, samples: int = 5, bootstrap: int = 1000,
                   seed: int = 0) -> list[Section]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [p / n for n in RUN_FILES if (p / n).is_file()]
            if not found:
                raise DataError(f"{p} holds none of {', '.join(RUN_FILES)}",
                                "pass a run directory or the files to report on")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p} does not exist", "check the path")
    sections = []
    for path in files:
        kind = classify(path)
        if kind is None:
            raise DataError(f"{path} is not a file the report knows (metrics, results, responses, judge "
                            "scores or comparisons)",
                            "pass the files 'pretrain', 'finetune' and 'eval' write")
        if kind == "metrics":
            sections.append(metrics_section(path))
        elif kind == "results":
            sections.append(results_section(path))
        else:
            records = read_jsonl(path)
            if not records:
                raise DataError(f"{path} is empty", "pass a file with records")
            if kind == "responses":
                sections.append(responses_section(path, records, samples))
            elif kind == "judge":
                sections.append(judge_section(path, records))
            else:
                sections.append(ranking_section(path, records, bootstrap, seed))
    return sections


# ----- rendering ------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; }
.source { color: #777; font-size: .85rem; font-family: monospace; }
table { border-collapse: collapse; margin: .8rem 0; }
th, td { border: 1px solid #ddd; padding: .3rem .7rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
.samples td { white-space: pre-wrap; width: 33%; font-size: .9rem; }
"""


def render_html(sections: Sequence[Section], title: str) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    for s in sections:
        out.append(f"<section><h2>{esc(s.title)}</h2><div class='source'>{esc(s.source)}</div>")
        out.extend(f"<p>{esc(t)}</p>" for t in s.text)
        for table in s.tables:
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr>")
            for row in table.rows:
                cells = "".join(f"<td class='num'>{esc(c)}</td>" if _numeric(c) else f"<td>{esc(c)}</td>"
                                for c in row)
                out.append(f"<tr>{cells}</tr>")
            out.append("</table>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            out.append(f"<figure><img alt='{esc(f.title)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{esc(f.title)}</figcaption></figure>")
        if s.samples:
            out.append("<h3>Sample responses</h3><table class='samples'><tr><th>instruction</th>"
                       "<th>reference</th><th>response</th></tr>")
            for sample in s.samples:
                out.append("<tr>" + "".join(f"<td>{esc(sample[k])}</td>"
                                            for k in ("instruction", "reference", "response")) + "</tr>")
            out.append("</table>")
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_markdown(sections: Sequence[Section], title: str, figure_dir: Path, link_base: Path) -> str:
    """Markdown; figures are written into ``figure_dir`` and linked relative to ``link_base``."""
    def cell(text: str) -> str:
        return html.escape(text).replace("|", "\\|").replace("\n", "<br>")

    out = [f"# {title}\n"]
    n = 0
    for s in sections:
        out.append(f"## {s.title}\n\n`{s.source}`\n")
        out.extend(f"{t}\n" for t in s.text)
        for table in s.tables:
            out.append("| " + " | ".join(map(cell, table.header)) + " |")
            out.append("|" + "---|" * len(table.header))
            out.extend("| " + " | ".join(map(cell, row)) + " |" for row in table.rows)
            out.append("")
        for f in s.figures:
            n += 1
            figure_dir.mkdir(parents=True, exist_ok=True)
            path = figure_dir / f"figure{n}.png"
            path.write_bytes(f.png)
            out.append(f"![{f.title}]({path.relative_to(link_base).as_posix()})\n")
        if s.samples:
            out.append("| instruction | reference | response |\n|---|---|---|")
            out.extend("| " + " | ".join(cell(x[k]) for k in ("instruction", "reference", "response")) + " |"
                       for x in s.samples)
            out.append("")
    return "\n".join(out) + "\n"


def write_report(paths: Sequence[str | Path], out: str | Path, *, title: str = "scratchlm evaluation report",
                 samples: int = 5, bootstrap: int = 1000, seed: int = 0) -> Path:
    from scratchlm.checkpoint.atomic import atomic_path

    out = Path(out)
    if out.suffix not in (".html", ".htm", ".md"):
        raise ConfigError(f"--out {out} is neither .html nor .md", "name the report report.html or report.md")
    if not paths:
        raise ConfigError("nothing to report on", "pass run directories or result files")
    sections = build_sections(paths, samples=samples, bootstrap=bootstrap, seed=seed)
    if out.suffix == ".md":
        text = render_markdown(sections, title, out.parent / f"{out.stem}_files", out.parent)
    else:
        text = render_html(sections, title)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
