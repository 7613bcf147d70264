"""Mutation scores per module from the last ``mutmut run`` (docs/testing.md has the commands).

Reads ``mutmut results --all true`` and counts, for the functions each module's run covers,
killed (a test failed, or the mutant hung past mutmut's timeout), survived, and not checked.
``-v`` also lists the survivors (``mutmut show NAME`` prints one's diff).

    python benchmarks/mutation_scores.py [-v]
"""

from __future__ import annotations

import collections
import fnmatch
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What docs/testing.md's commands run: whole modules for the loss and perplexity, the arithmetic
# of sampling and the weight mapping of checkpoint/hf.py.
S, H = "scratchlm.generation.sampling.", "scratchlm.checkpoint.hf."
RUNS = {
    "training/losses.py": ["scratchlm.training.losses.*"],
    "evaluation/perplexity.py": ["scratchlm.evaluation.perplexity.*"],
    "generation/sampling.py": [S + "x_process_logits*", S + "x__top_p*", S + "x_sample*", S + "xǁSamplerǁ*"],
    "checkpoint/hf.py": [H + "x_import_weights*", H + "x_export_weights*", H + "xǁRowǁexpand*",
                         H + "xǁFamilyǁcanonical*", H + "x__rope_from_hf*"],
}


def main() -> int:
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    fates = dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    for module, globs in RUNS.items():
        mine = {k: v for k, v in fates.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}
        count = collections.Counter(mine.values())
        killed = count["killed"] + count["timeout"]
        checked = sum(n for fate, n in count.items() if fate != "not checked")
        score = f"{killed / checked:.0%}" if checked else "-"
        print(f"{module:26} {killed:4} killed / {checked:4} checked = {score:>4}  "
              f"(survived {count['survived']}, no tests {count['no tests']}, "
              f"not checked {count['not checked']})")
        if "-v" in sys.argv:
            for name in sorted(k for k, v in mine.items() if v == "survived"):
                print("    survived:", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
