"""Classification finetuning, Raschka ch. 6's recipe on SmolLM2-135M: scratchlm against a plain loop.

The recipe: SMS spam balanced to 747 + 747, split 0.7/0.1/0.2 (seed 123), the last transformer
block, the final norm and a new 2-way head trainable, AdamW lr 5e-5 weight decay 0.1, batch 8,
5 epochs (130 steps each), training and validation accuracy after every epoch (5 batches each,
his eval_iter), and train, validation and test accuracy on every example at the end.

* **scratchlm**: ``scratchlm.finetune.classify.finetune_classifier`` run whole (the frozen 29
  blocks computed once per text, then only the last block trains), timed end to end, model load
  excluded on both sides.
* **peer**: the same recipe as a plain PyTorch loop over ``transformers``' Llama (loaded from the
  same GGUF file): every step and every evaluation batch runs all 30 blocks.  Texts are padded
  to the batch's longest, the head reads the last real token.  Its whole run would take many
  minutes, so it is timed on ``--peer-steps`` training steps (random batches of the training
  split) and ``--peer-eval-batches`` evaluation batches, and extrapolated to the recipe's 650
  steps and its evaluations (printed as such).

``--train lora`` is Raschka's appendix E instead: rank-16 adapters on every linear layer of the
30 blocks plus the head, everything else frozen (``--lora-alpha 256`` is the book's scale of 16:
it multiplies by alpha alone, peft by alpha / rank); ours with ``--precision auto`` (what the
command picks), the peer with ``peft`` in fp32 (the issue's measurement) and, with
``--peer-bf16``, also under bf16 autocast.

    python benchmarks/classify_smollm2.py [--threads 2] [--peer-steps 8] [--peer-eval-batches 4]
    python benchmarks/classify_smollm2.py --train lora --peer-steps 16 [--peer-bf16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = SHARED / "data" / "sms_spam_collection.tsv"


def recipe_splits(seed: int = 123):
    from scratchlm.finetune.data import balance, label_set, read_labelled, split

    train, val, test = split(balance(read_labelled(DATA), seed), [0.7, 0.1, 0.2], seed)
    return train, val, test, label_set(train, val, test)


def ours(train, val, test, labels, args) -> tuple[float, dict]:
    import scratchlm
    from scratchlm.cli.finetune import CLASSIFY
    from scratchlm.finetune.classify import ClassifyRecipe, finetune_classifier
    from scratchlm.finetune.lora_config import LoRAConfig

    lm = scratchlm.load(MODEL)
    lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha) if args.train == "lora" else None
    recipe = ClassifyRecipe(train, val, test, labels, mode=args.train, lora=lora, base_model=str(MODEL))
    config = CLASSIFY.replace(progress=False, precision=args.precision)
    t0 = time.perf_counter()
    result = finetune_classifier(lm.model, lm.tokenizer, recipe, config)
    return time.perf_counter() - t0, result.figures


def peer_times(train, labels, args, bf16: bool = False) -> tuple[float, float]:
    """Mean seconds per training step and per evaluation batch of the plain transformers loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL.parent, gguf_file=MODEL.name)
    model = AutoModelForCausalLM.from_pretrained(MODEL.parent, gguf_file=MODEL.name,
                                                 torch_dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.train == "lora":
        import peft

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                                                           lora_dropout=0.0, target_modules=targets))
        body = model.base_model.model.model
    else:
        body = model.model
        for p in [*body.layers[-1].parameters(), *body.norm.parameters()]:
            p.requires_grad_(True)
    head = torch.nn.Linear(body.config.hidden_size, len(labels), bias=False)
    decay = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad and p.dim() >= 2
             and (args.train != "lora" or p is head.weight)]
    rest = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad
            and all(p is not q for q in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": rest, "weight_decay": 0.0}], lr=5e-5)
    index = {label: i for i, label in enumerate(labels)}
    pad = tokenizer.eos_token_id

    def batch(items):
        ids = [tokenizer(x.text)["input_ids"] for x in items]
        width = max(map(len, ids))
        x = torch.full((len(ids), width), pad)
        mask = torch.zeros_like(x)
        for row, seq in enumerate(ids):
            x[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        return x, mask, torch.tensor([index[i.label] for i in items])

    def logits(x, mask):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
            return head(hidden[torch.arange(len(x)), mask.sum(1) - 1]).float()

    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=g).tolist()
    step_times, eval_times = [], []
    model.train()
    for k in range(args.peer_steps + 1):  # the first step warms up
        x, mask, y = batch([train[i] for i in order[k * 8:(k + 1) * 8]])
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(logits(x, mask), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if k:
            step_times.append(time.perf_counter() - t0)
    model.eval()
    with torch.no_grad():
        for k in range(args.peer_eval_batches):
            x, mask, _ = batch([train[i] for i in order[-(k + 1) * 8:][:8]])
            t0 = time.perf_counter()
            logits(x, mask).argmax(-1)
            eval_times.append(time.perf_counter() - t0)
    return statistics.mean(step_times), statistics.mean(eval_times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", choices=("last-block", "lora"), default="last-block")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=256.0)
    parser.add_argument("--precision", default=None, help="ours: fp32 for last-block, auto for lora")
    parser.add_argument("--peer-steps", type=int, default=8)
    parser.add_argument("--peer-eval-batches", type=int, default=4)
    parser.add_argument("--peer-bf16", action="store_true", help="also time the peer under bf16 autocast")
    parser.add_argument("--no-peer", action="store_true", help="time scratchlm only")
    parser.add_argument("--no-ours", action="store_true", help="time the peer only")
    args = parser.parse_args()
    args.precision = args.precision or ("auto" if args.train == "lora" else "fp32")
    if not MODEL.exists() or not DATA.exists():
        print(f"skipped: {MODEL} or {DATA} is absent (they live in ../shared beside the checkout)")
        return 0
    torch.set_num_threads(args.threads)
    train, val, test, labels = recipe_splits()
    seconds = None
    if not args.no_ours:
        seconds, figures = ours(train, val, test, labels, args)
        print(f"scratchlm --train {args.train}: whole run {seconds:.1f} s ({figures['steps']} steps), "
              f"test accuracy {figures['test_accuracy'] * 100:.2f} %, validation "
              f"{figures['val_accuracy'] * 100:.2f} %, train {figures['train_accuracy'] * 100:.2f} %")
    if args.no_peer:
        return 0
    steps = 5 * (len(train) // 8)
    # the recipe's evaluations: 5 batches of each split after every epoch (Raschka's eval_iter), then
    # every example of the three splits at the end
    eval_batches = 5 * (5 + 5) + sum(math.ceil(len(part) / 8) for part in (train, val, test))
    for bf16 in (False, True) if args.peer_bf16 else (False,):
        try:
            step, evaluation = peer_times(train, labels, args, bf16)
        except ImportError as err:
            print(f"peer not run: transformers or peft could not be imported ({err})")
            return 0
        peer = steps * step + eval_batches * evaluation
        name = "transformers + peft" if args.train == "lora" else "transformers"
        print(f"peer ({name}, plain loop, {'bf16 autocast' if bf16 else 'fp32'}): {step:.3f} s per training "
              f"step, {evaluation:.3f} s per evaluation batch (means of {args.peer_steps} and "
              f"{args.peer_eval_batches}, measured); whole run extrapolated to {steps} steps + "
              f"{eval_batches} evaluation batches = {peer:.0f} s")
        if seconds is not None:
            print(f"ratio: scratchlm is {peer / seconds:.2f}x faster on the whole run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
