"""Burkov's progression on one text: Laplace 3-gram, Kneser-Ney 5-gram, Elman RNN, LSTM, transformer.

Every model is trained by the public CLI (``scratchlm pretrain --preset ...``) on the demo's data
and split (builtin:tinyshakespeare, character level, first 90% train, last 10% validation) and
judged by the same figure: validation nats per character (total nats over the validation split /
its characters).  The neural models get the same wall-clock budget (``--budget``, default 300 s:
the demo's 5 minutes) and otherwise the demo's settings (batch 6, context 128, cosine schedule,
evaluation every 250 steps); the n-grams need no budget, counting takes seconds.

    python benchmarks/lm_comparison.py --out runs/lm-comparison --plot docs/lm_comparison.png
    python benchmarks/lm_comparison.py --budget 15 --threads 1 --out /tmp/lmc   # a smoke run
    python benchmarks/lm_comparison.py --out runs/lm-comparison --reuse          # re-plot finished runs

Printed: a markdown table (model, preset, parameters — for an n-gram the stored n-gram counts —,
training time, validation nats/char), the command of every run; plotted: validation nats/char
against seconds for the neural models (periodic evaluations score a fixed subset of the
validation windows, the final star the whole split) and a horizontal line for each n-gram.

Per-model settings beyond the preset are in ``MODELS``: the LSTM trains at lr 1e-2 (the demo's
3e-3 left it at 2.29 nats/char after 300 steps, 1e-2 at 2.06; the Elman RNN was better at 3e-3).
Timings mean something only on a quiet machine: run nothing else alongside.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

# name -> (preset, extra pretrain options, kind)
MODELS: dict[str, tuple[str, list[str], str]] = {
    "Laplace 3-gram": ("ngram-laplace3", [], "count"),
    "Kneser-Ney 5-gram": ("ngram-kn5", [], "count"),
    "Elman RNN": ("elman-small", [], "neural"),
    "LSTM": ("lstm-small", ["--lr", "1e-2"], "neural"),
    "transformer (demo)": ("shakespeare-char", [], "neural"),
}
COLORS = {
    "Laplace 3-gram": "tab:gray",
    "Kneser-Ney 5-gram": "tab:brown",
    "Elman RNN": "tab:green",
    "LSTM": "tab:orange",
    "transformer (demo)": "tab:blue",
}


def command(name: str, run_dir: Path, args: argparse.Namespace) -> list[str]:
    preset, extra, kind = MODELS[name]
    cmd = [
        sys.executable,
        "-m",
        "scratchlm",
        "pretrain",
        "--preset",
        preset,
        "--data",
        args.data,
        "--out",
        str(run_dir),
        *extra,
    ]
    if kind == "neural":
        cmd += ["--max-time", f"{args.budget:g}"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd


def slug(name: str) -> str:
    return MODELS[name][0]


def finished(run_dir: Path) -> bool:
    from scratchlm.training.logging import read_metrics

    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(r.get("final") for r in read_metrics(path))


def summarize(name: str, run_dir: Path) -> dict:
    """Parameters, training time, the final figure and the evaluation curve of a finished run."""
    import scratchlm
    from scratchlm.training.logging import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval" and r.get("val_nats_per_char") is not None]
    final = evals[-1]
    lm = scratchlm.load(run_dir, device="cpu")
    params = sum(p.numel() for p in lm.model.parameters())  # an n-gram's parameters are its counts
    # an n-gram's training is its counting pass (its one "train" record); a neural run's lasts to its
    # last logged step (every 10 steps), after which comes only the evaluation of the whole split
    seconds = max(r["elapsed"] for r in records if r.get("kind") == "train")
    return {
        "model": name,
        "preset": slug(name),
        "kind": MODELS[name][2],
        "parameters": params,
        "train_seconds": seconds,
        "val_nats_per_char": final["val_nats_per_char"],
        "step": final["step"],
        "tokens": final["tokens"],
        "curve": [(r["elapsed"], r["val_nats_per_char"], bool(r.get("final"))) for r in evals],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | preset | parameters | training time | val nats/char |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        what = "counts" if r["kind"] == "count" else f"steps {r['step']:,}"
        lines.append(
            f"| {r['model']} | `{r['preset']}` | {r['parameters']:,} | {r['train_seconds']:.1f} s "
            f"({what}) | **{r['val_nats_per_char']:.3f}** |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, budget: float, note: str) -> None:
    from demo_vs_nanogpt import curve_axes, save_curve  # (this folder: run as a script)

    fig, ax = curve_axes((9, 4.5))
    right = max([budget * 1.05] + [r["curve"][-1][0] * 1.02 for r in rows])
    highest = 0.0
    for r in rows:
        color = COLORS.get(r["model"])
        if r["kind"] == "count":
            nats = r["val_nats_per_char"]
            ax.axhline(
                nats,
                color=color,
                ls="--",
                lw=1.2,
                label=f"{r['model']}: {nats:.3f} ({r['train_seconds']:.0f} s)",
            )
            ax.plot([r["train_seconds"]], [nats], "D", ms=5, color=color)
            highest = max(highest, nats)
            continue
        periodic = [(s, v) for s, v, final in r["curve"] if not final]
        if periodic:
            ax.plot(*zip(*periodic, strict=True), "o-", ms=3, lw=1.4, color=color)
            highest = max(highest, max(v for _, v in periodic))
        s, v, _ = r["curve"][-1]
        ax.plot([s], [v], "*", ms=11, color=color, label=f"{r['model']}: {v:.3f}")
        highest = max(highest, v)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_curve(fig, ax, path, f"tinyshakespeare, character level, {budget:g} s per neural model", note,
               top=highest + 0.15, right=right)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per neural model (default: 300)")
    parser.add_argument(
        "--data", default="builtin:tinyshakespeare", help="training text (default: the demo's)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the run dirs, one per model (default: runs/lm-comparison-TIMESTAMP)",
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="figure to write, e.g. docs/lm_comparison.png"
    )
    parser.add_argument("--threads", type=int, default=0, help="--threads for every run (default: the CLI's)")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of: {', '.join(MODELS)}"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse finished run dirs found in --out")
    parser.add_argument("--note", default="", help="a line under the plot's title (e.g. the machine's state)")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    out = args.out or REPO / "runs" / f"lm-comparison-{time.strftime('%Y%m%d-%H%M%S')}"

    rows, commands = [], []
    for name in names:
        run_dir = out / slug(name)
        cmd = command(name, run_dir, args)
        commands.append(" ".join(cmd[1:]).replace("-m scratchlm", "scratchlm", 1))
        if args.reuse and finished(run_dir):
            print(f"[{name}] reusing {run_dir}", file=sys.stderr)
        else:
            print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows.append(summarize(name, run_dir))
        r = rows[-1]
        print(
            f"[{name}] {r['val_nats_per_char']:.4f} nats/char, {r['parameters']:,} parameters, "
            f"{r['train_seconds']:.1f} s",
            file=sys.stderr,
        )

    print(table(rows))
    print("\ncommands:")
    for c in commands:
        print(f"  {c}")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(f"\nrun dirs and results.json: {out}")
    if args.plot is not None:
        plot(rows, args.plot, args.budget, args.note)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
