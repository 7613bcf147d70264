"""The 5-minute demo against nanoGPT's documented CPU run of shakespeare_char.

nanoGPT (character level, 4 layers, 4 heads, 128 wide, context 64, batch 12, no dropout), measured
once on a quiet 2-core machine of the kind this project targets: validation 1.886 nats/char after
2,000 iterations in 110 s; with its schedule stretched to 5,400 iterations, best validation 1.678
in 259 s.  These two points are *recorded anchors*: this script does not run nanoGPT (it is not a
dependency), it prints and plots them as constants, labelled "recorded".  Targets for
``scratchlm pretrain`` with no options: below 1.886 by 110 s, at most 1.60
at the end of its 300 s.

This script runs the default pretrain (or reads the ``metrics.jsonl`` of a run that already
happened), prints the validation nats/char reached by 110 s and at the end beside nanoGPT's
points, and plots the whole curve against seconds with nanoGPT's points on it.

    python benchmarks/demo_vs_nanogpt.py                          # runs 'scratchlm pretrain' (5 min)
    python benchmarks/demo_vs_nanogpt.py --metrics runs/X/metrics.jsonl
    python benchmarks/demo_vs_nanogpt.py --plot docs/demo_curve.png

"At 110 s" is the last evaluation whose ``elapsed`` is at most 110 s: what the run had actually
reached by then, on its own clock (evaluations and checkpoints included).  The machine must be
quiet for the seconds to mean anything; on shared cores every figure here is pessimistic.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NANOGPT = {  # (seconds, validation nats/char, what)
    "short": (110.0, 1.886, "2,000 iters"),
    "stretched": (259.0, 1.678, "5,400 iters, best"),
}
TARGET_EARLY = (110.0, 1.886)  # below this by 110 s
TARGET_END = 1.60  # at most this at the end


def run_demo(out: Path, extra: list[str]) -> Path:
    cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--out", str(out), *extra]
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out / "metrics.jsonl"


def eval_points(metrics: Path) -> list[tuple[float, float, int]]:
    """(elapsed seconds, validation nats/char, step) of every evaluation, in order.

    The periodic evaluations score a fixed subset of the validation windows (to stay cheap); the
    final one scores the whole split, so it can sit a few hundredths off the curve.
    """
    sys.path.insert(0, str(REPO / "src"))
    from scratchlm.training.logging import read_metrics

    points = [(r["elapsed"], r["val_nats_per_char"], r["step"]) for r in read_metrics(metrics)
              if r.get("kind") == "eval" and r.get("val_nats_per_char") is not None]
    if not points:
        raise SystemExit(f"{metrics} has no evaluation lines with val_nats_per_char")
    return points


def at_or_before(points: list[tuple[float, float, int]], seconds: float) -> tuple[float, float, int] | None:
    earlier = [p for p in points if p[0] <= seconds]
    return earlier[-1] if earlier else None


def curve_axes(figsize: tuple[float, float]):
    """A figure for validation nats/char against seconds (this script's and lm_comparison.py's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    ax.set_xlabel("seconds (wall clock, evaluation included)")
    ax.set_ylabel("validation loss (nats per character)")
    ax.grid(alpha=0.3)
    return fig, ax


def save_curve(fig, ax, path: Path, title: str, note: str, top: float, right: float) -> None:
    """Limit the axes (y from 1.3 to ``top``, at most 3.5), title the figure and write it to ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlim(0, right)
    ax.set_ylim(1.3, min(3.5, top))
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot(points: list[tuple[float, float, int]], path: Path, note: str = "") -> None:
    fig, ax = curve_axes((7, 4.2))
    ax.plot([p[0] for p in points[:-1]], [p[1] for p in points[:-1]], "o-", ms=3, lw=1.5, color="tab:blue",
            label="scratchlm pretrain (defaults), validation subset")
    ax.plot([points[-1][0]], [points[-1][1]], "*", ms=11, color="tab:blue",
            label="scratchlm at the end, whole validation split")
    for name, (secs, nats, what) in NANOGPT.items():
        ax.plot([secs], [nats], "s", ms=7, color="tab:red",
                label="nanoGPT (recorded anchor, not run here)" if name == "short" else None)
        ax.annotate(f"nanoGPT {what} (recorded): {nats}", (secs, nats), textcoords="offset points",
                    xytext=(6, 6), fontsize=8, color="tab:red")
    ax.axhline(TARGET_END, color="gray", ls="--", lw=0.8)
    ax.annotate(f"target at the end: {TARGET_END}", (5, TARGET_END), textcoords="offset points",
                xytext=(0, -11), fontsize=8, color="gray")
    ax.axvline(TARGET_EARLY[0], color="gray", ls=":", lw=0.8)
    ax.legend(loc="upper right")
    save_curve(fig, ax, path, "tinyshakespeare, character level, 2 CPU cores", note,
               top=max(p[1] for p in points) + 0.1, right=max(310, points[-1][0] + 10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=Path,
                        help="metrics.jsonl of a finished run (default: run the demo)")
    parser.add_argument("--out", type=Path, help="run dir for the demo run (default: a temporary directory)")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "demo_curve.png", help="figure to write")
    parser.add_argument("--note", default="", help="a line under the plot's title (e.g. the machine's state)")
    parser.add_argument("pretrain_args", nargs="*", help="extra options for 'scratchlm pretrain' (after --)")
    args = parser.parse_args()
    if args.metrics is None:
        out = args.out or Path(tempfile.mkdtemp(prefix="demo-")) / "run"
        args.metrics = run_demo(out, args.pretrain_args)
    points = eval_points(args.metrics)
    early = at_or_before(points, TARGET_EARLY[0])
    end = points[-1]
    best = min(points, key=lambda p: p[1])
    print(f"{'':28} {'seconds':>8} {'val nats/char':>14} {'step':>7}")
    ns, nn, nw = NANOGPT["short"]
    print(f"{'nanoGPT ' + nw + ' (recorded)':28} {ns:8.0f} {nn:14.3f} {2000:7}")
    if early:
        print(f"{'scratchlm by 110 s':28} {early[0]:8.0f} {early[1]:14.3f} {early[2]:7}")
    else:
        print(f"{'scratchlm by 110 s':28} {'-':>8} {'no evaluation yet':>14}")
    ns, nn, nw = NANOGPT["stretched"]
    print(f"{'nanoGPT ' + nw + ' (recorded)':28} {ns:8.0f} {nn:14.3f} {5400:7}")
    print(f"{'scratchlm at the end':28} {end[0]:8.0f} {end[1]:14.3f} {end[2]:7}")
    print(f"{'scratchlm best':28} {best[0]:8.0f} {best[1]:14.3f} {best[2]:7}")
    ok_early = early is not None and early[1] < TARGET_EARLY[1]
    ok_end = end[1] <= TARGET_END
    verdict = "met" if ok_early else "MISSED"
    print(f"\ntarget 1: below {TARGET_EARLY[1]} by {TARGET_EARLY[0]:.0f} s -> {verdict}"
          + (f" (nanoGPT's loss / ours = {TARGET_EARLY[1] / early[1]:.3f})" if early else ""))
    print(f"target 2: at most {TARGET_END} at the end -> {'met' if ok_end else 'MISSED'} "
          f"(nanoGPT's best {NANOGPT['stretched'][1]} / ours = {NANOGPT['stretched'][1] / end[1]:.3f})")
    plot(points, args.plot, args.note)
    print(f"plot: {args.plot}")
    return 0 if ok_early and ok_end else 1


if __name__ == "__main__":
    raise SystemExit(main())
