"""LoRA training step: our LoRALinear against transformers + peft, same model, adapters and batch.

One step = forward to the last token's hidden state, a 2-way linear head, cross-entropy,
backward, AdamW over the adapters and the head: the step of a LoRA classifier (Raschka's
appendix E recipe: rank 16, alpha 16, every linear layer of the blocks).  The base is
SmolLM2-135M (the shared .gguf, dequantized, saved as a Hugging Face directory that transformers
opens), batch 2 × 120 tokens (the book's max_len 120), fp32, one thread.

Both sides run in one process from the same weights: peft gets its adapter from our
``save_adapter``, so A, B and the head start equal (B random, so the adapter path is not a
multiply by zero), and the first step's losses are printed side by side.  The sides alternate one
step each per round, so a noisy neighbour on shared cores slows both alike; printed: the median
step of each and the median of the per-round ratios (paired).

With ``--bf16 --ablate``, two more sides undo one of our bf16 choices each, in the same rounds:
torch's bf16 flash attention instead of ``grouped_attention`` (``models.attention.attend``), and
autocast's cast of every frozen weight at every call instead of the one kept copy
(``LoRALinear._base_forward``); each prints its slowdown against ours.

    python benchmarks/lora_step.py                 # 8 rounds
    python benchmarks/lora_step.py --rounds 4 --threads 2
    python benchmarks/lora_step.py --rounds 6 --threads 1 --bf16 --ablate --batch 8 --length 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT), help="the base model (what scratchlm.load opens)")
    parser.add_argument("--rounds", type=int, default=8, help="steps per side (after one warm-up step each)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=120)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bf16", action="store_true",
                        help="also time ours under bf16 autocast (fp32 master weights), what "
                        "'finetune classify --precision auto' picks on CPUs with fast bf16 matmuls")
    parser.add_argument("--ablate", action="store_true",
                        help="with --bf16: also time ours without grouped attention, and without the kept "
                        "bf16 copies of the frozen weights")
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        print(f"skipped: {args.model} not present (the shared models folder is optional)")
        return 0
    import peft
    import transformers

    import scratchlm
    from scratchlm.checkpoint.hf import save_hf
    from scratchlm.finetune.lora import LoRAConfig, adapter_parameters, apply_lora, save_adapter

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="lora-step-"))
    lm = scratchlm.load(args.model, device="cpu")
    save_hf(lm.model, lm.config, tmp / "base")
    apply_lora(lm.model, LoRAConfig(rank=args.rank, alpha=args.alpha))
    with torch.no_grad():
        for p in adapter_parameters(lm.model):
            if p.shape[1] == args.rank:  # B
                p.normal_(std=0.01)
    save_adapter(lm.model, tmp / "adapter", tmp / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp / "adapter", is_trainable=True)
    ours = lm.model

    d = lm.config.n_embd
    head_ours = torch.nn.Linear(d, 2)
    head_theirs = torch.nn.Linear(d, 2)
    head_theirs.load_state_dict(head_ours.state_dict())
    ids = torch.randint(0, lm.config.vocab_size, (args.batch, args.length))
    labels = torch.randint(0, 2, (args.batch,))

    def hidden_ours() -> torch.Tensor:
        return ours(ids, return_hidden=True)[:, -1]

    def hidden_theirs() -> torch.Tensor:
        return theirs.base_model.model.model(input_ids=ids, use_cache=False).last_hidden_state[:, -1]

    import contextlib

    import scratchlm.models.attention as attention
    from scratchlm.finetune.lora import LoRALinear

    @contextlib.contextmanager
    def flash_attention():  # torch's kernel whatever the dtype
        grouped = attention.GROUPED_MAX_SCORES
        attention.GROUPED_MAX_SCORES = 0
        try:
            yield
        finally:
            attention.GROUPED_MAX_SCORES = grouped

    @contextlib.contextmanager
    def cast_every_call():  # autocast's own handling of the frozen base weights
        kept = LoRALinear._base_forward
        LoRALinear._base_forward = lambda self, x: self.base(x)
        try:
            yield
        finally:
            LoRALinear._base_forward = kept

    sides = {}
    runs = [("transformers+peft", theirs, hidden_theirs, head_theirs, False, contextlib.nullcontext),
            ("ours", ours, hidden_ours, head_ours, False, contextlib.nullcontext)]
    if args.bf16:
        runs.append(("ours, bf16 autocast", ours, hidden_ours, head_ours, True, contextlib.nullcontext))
        if args.ablate:
            runs += [("bf16, flash attention", ours, hidden_ours, head_ours, True, flash_attention),
                     ("bf16, cast every call", ours, hidden_ours, head_ours, True, cast_every_call)]
    for name, model, hidden, head, bf16, variant in runs:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)

        def step(hidden=hidden, head=head, optimizer=optimizer, bf16=bf16, variant=variant
                 ) -> tuple[float, float]:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with variant():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = F.cross_entropy(head(hidden()).float(), labels)
                loss.backward()
            optimizer.step()
            return time.perf_counter() - start, loss.item()

        sides[name] = (step, params)
    print(f"trainable parameters: ours {sum(p.numel() for p in sides['ours'][1]):,}, "
          f"transformers+peft {sum(p.numel() for p in sides['transformers+peft'][1]):,}")
    first = {name: step()[1] for name, (step, _) in sides.items()}  # warm-up; the same loss on both sides
    print("first-step loss: " + ", ".join(f"{name} {loss:.6f}" for name, loss in first.items()))
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, _) in sides.items():
            times[name].append(step()[0])
    base = times["transformers+peft"]
    for name, t in times.items():
        paired = statistics.median(b / s for b, s in zip(base, t, strict=True))
        print(f"{name:>22}: median step {statistics.median(t):.3f} s, best {min(t):.3f} s, "
              f"speed-up over transformers+peft (paired median) {paired:.2f}x")
    for name in ("bf16, flash attention", "bf16, cast every call"):
        if name in times:
            slower = statistics.median(a / b for a, b in zip(times[name], times["ours, bf16 autocast"],
                                                             strict=True))
            print(f"{name}: {slower:.2f}x the time of ours in bf16 (paired median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
