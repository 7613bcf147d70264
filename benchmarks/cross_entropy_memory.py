"""Peak memory of the training loss: ``cross_entropy_sum`` against ``F.cross_entropy``, side by side.

The claim in docs/benchmarks.md: computing the cross-entropy a chunk of rows at a time (in float32,
whatever the logits' dtype) lowers the peak memory of a forward + backward pass.  This measures
the loss alone, on logits the size of gpt2-124m's at batch 8 × 256 (2,048 × 50,257): each side runs
in a fresh process, which makes its logits, computes the summed loss and its gradient, and
reports how far its peak resident set (``VmHWM``) rose above what it held with the logits made.
The torch side is what a training loop writes without our loss:
``F.cross_entropy(logits.float(), targets, reduction="sum")``.

    python benchmarks/cross_entropy_memory.py                  # bf16 and fp32, both sides
    python benchmarks/cross_entropy_memory.py --rows 512       # smaller logits

Linux only (``/proc/self/status``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SIDES = ("torch", "scratchlm")
DTYPES = ("bfloat16", "float32")


def vm_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(side: str, dtype: str, rows: int, vocab: int) -> None:
    import torch
    import torch.nn.functional as F

    from scratchlm.training.losses import cross_entropy_sum

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=g).to(getattr(torch, dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    before = vm_mib("VmRSS")
    if side == "torch":
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    else:
        loss = cross_entropy_sum(logits, targets)
    loss.backward()
    print(json.dumps({"peak_above_logits_mib": vm_mib("VmHWM") - before, "loss": float(loss)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8 * 256, help="rows of logits (batch × context)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.rows, args.vocab)
        return 0
    print(f"logits {args.rows} × {args.vocab}; peak resident memory above the logits, MiB "
          "(fresh process per figure)")
    for dtype in DTYPES:
        peaks, losses = {}, {}
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--child", side, dtype, "--rows", str(args.rows),
                                  "--vocab", str(args.vocab)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[side], losses[side] = result["peak_above_logits_mib"], result["loss"]
        rel = abs(losses["torch"] - losses["scratchlm"]) / abs(losses["torch"])
        print(f"{dtype:9} torch {peaks['torch']:7.0f}  scratchlm {peaks['scratchlm']:7.0f}  "
              f"saved {peaks['torch'] - peaks['scratchlm']:6.0f} MiB "
              f"({peaks['scratchlm'] / peaks['torch']:.2f}x torch's peak); "
              f"losses equal to {rel:.1e} relative")
    return 0


if __name__ == "__main__":
    sys.exit(main())
