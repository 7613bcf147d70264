"""bf16 autocast against fp32: the same loss curve within noise?

Trains the same model on the same data with ``scratchlm pretrain`` in fp32 and in bf16 (autocast,
fp32 master weights and optimizer state) for each of a few seeds, and prints the validation
loss at every evaluation.  The seed-to-seed spread of the fp32 runs is the noise; bf16 is "the
same curve within noise" when its difference from fp32 at the same seed is of that size or
smaller.

    python benchmarks/bf16_loss_curve.py                            # demo preset, 500 steps, 2 seeds
    python benchmarks/bf16_loss_curve.py --steps 300 --seeds 1,2,3 --args "--preset tiny-gpt2"

Every other option is the demo's (``scratchlm pretrain`` with no options), so the default runs
the 5-minute demo's model on builtin:tinyshakespeare; ``--args`` passes more options through.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(out: Path, precision: str, seed: int, steps: int, eval_every: int,
        extra: list[str]) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation of one ``scratchlm pretrain`` run."""
    sys.path.insert(0, str(REPO / "src"))
    from scratchlm.training.logging import read_metrics

    cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--out", str(out), "--precision", precision,
           "--seed", str(seed), "--max-steps", str(steps), "--eval-every", str(eval_every),
           "--sample-tokens", "0", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [(r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl")
            if r.get("kind") == "eval" and r.get("val_loss") is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", default="1337,1338", help="comma-separated")
    parser.add_argument("--args", default="", help="more scratchlm pretrain options, quoted")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = shlex.split(args.args)
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in ("fp32", "bf16"):
                out = Path(tmp) / f"{precision}-{seed}"
                curves[precision, seed] = run(out, precision, seed, args.steps, args.eval_every, extra)
                print(f"ran {precision} seed {seed}", file=sys.stderr)
    steps = [s for s, _ in curves["fp32", seeds[0]]]
    print(f"validation loss, {args.steps} steps; options: {args.args or '(the demo)'}")
    print("step  " + "".join(f"{'fp32 ' + str(s):>12}{'bf16 ' + str(s):>12}" for s in seeds)
          + f"{'|bf16-fp32|':>13}{'fp32 spread':>13}")
    for i, step in enumerate(steps):
        fp32 = [curves["fp32", s][i][1] for s in seeds]
        bf16 = [curves["bf16", s][i][1] for s in seeds]
        diff = statistics.mean(abs(b - f) for b, f in zip(bf16, fp32, strict=True))
        spread = max(fp32) - min(fp32)
        print(f"{step:<6}" + "".join(f"{f:>12.4f}{b:>12.4f}" for f, b in zip(fp32, bf16, strict=True))
              + f"{diff:>13.4f}{spread:>13.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
