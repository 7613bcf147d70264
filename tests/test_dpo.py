"""DPO: exactness against a direct transformers computation under TRL's conventions and against one
step of trl's DPOTrainer (tiny random Llama saved by transformers, loaded with scratchlm.load), the
references (frozen copy, adapters off, precomputed), the CLI end to end, and the bad inputs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import scratchlm
from conftest import ctrl_c_at, realistic_weights
from scratchlm.data.instruction import book_split
from scratchlm.data.preference import PreferencePair, encode_pair, to_pair
from scratchlm.finetune.dpo import (
    AdapterReference,
    DPORecipe,
    EncodedPairs,
    FrozenReference,
    PairCollate,
    finetune_dpo,
)
from scratchlm.finetune.lora import LoRAConfig, disable_adapters
from scratchlm.prompts import PROMPT_STYLES
from scratchlm.tokenizers.train_bpe import train_bpe
from scratchlm.training.config import TrainConfig
from scratchlm.training.losses import DPOLoss, pair_logprobs, preference_loss

CORPUS = "a tiny corpus for a tiny tokenizer, tiny and fine. The answer is yes; the answer is no. " * 10
TOKENIZER = train_bpe(CORPUS, 270, special_tokens=("<|endoftext|>",))
OTHER_TOKENIZER = train_bpe("another text entirely, with other merges: zebra quartz jumps. " * 10, 270,
                            special_tokens=("<|endoftext|>",))
PAIRS = [PreferencePair("a tiny", " corpus for a tokenizer", " fine."),
         PreferencePair("The answer is", " yes; the answer", " no"),
         PreferencePair("tiny and", " fine", " a tiny tokenizer, tiny"),
         PreferencePair("a tin", "y corpus", "y answer is no")]  # a token merges across the boundary
TOL = 1e-5


def _save_llama(path: Path, seed: int, tokenizer=TOKENIZER) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.eos_id)
    model = transformers.LlamaForCausalLM(config)
    realistic_weights(model, seed)
    with torch.no_grad():  # logits spread over a few nats, not tens: the DPO sums stay in float32's range
        model.lm_head.weight.mul_(0.2)
    model.save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """The policy, a different reference with the same tokenizer, and a model with another tokenizer."""
    return {"policy": _save_llama(tmp_path_factory.mktemp("policy"), 0),
            "ref": _save_llama(tmp_path_factory.mktemp("ref"), 1),
            "other": _save_llama(tmp_path_factory.mktemp("other"), 2, OTHER_TOKENIZER)}


def _hf(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _hf_tokenizer(path: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _trl_ids(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16's tokenization (DPOTrainer._prepare_dataset), written out with a transformers tokenizer:
    the prompt alone, prompt + completion + EOS text together, the completion after their common prefix."""
    prompt = tokenizer(pair.prompt)["input_ids"]
    full = [tokenizer(pair.prompt + c + tokenizer.eos_token)["input_ids"]
            for c in (pair.chosen, pair.rejected)]

    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))

    n = min(common(prompt, full[0]), common(prompt, full[1]))
    return prompt[:n], full[0][n:], full[1][n:]


def _hf_sum(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) summed, one unpadded row through transformers."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, 1:]
    picked = logp[torch.arange(len(targets)), targets][len(prompt) - 1:]
    return float(picked.sum())


def _batch(tokenizer=TOKENIZER, pairs=PAIRS):
    return PairCollate(tokenizer.eos_id)([encode_pair(p, tokenizer) for p in pairs])


def test_tokenization_is_trls(dirs):
    """Prompt and prompt + completion tokenized apart; the completion follows their common prefix, EOS
    appended.  For "a tin" + "y corpus" the two ways differ: " tiny" is one token of the conversation,
    so the prompt keeps "a" and the completion starts with the merged token, as in TRL."""
    hf = _hf_tokenizer(dirs["policy"])
    for pair in PAIRS:
        ours = encode_pair(pair, TOKENIZER)
        assert (ours.prompt, ours.chosen, ours.rejected) == _trl_ids(hf, pair)
        assert ours.chosen[-1] == ours.rejected[-1] == TOKENIZER.eos_id
    merged = encode_pair(PAIRS[3], TOKENIZER)
    separate = TOKENIZER.encode("a tin")
    assert merged.prompt == separate[:len(merged.prompt)] and len(merged.prompt) < len(separate)
    assert TOKENIZER.decode(merged.chosen).startswith(" tiny")


def test_logprob_sums_loss_and_rewards_equal_transformers(dirs):
    """Per-answer sums of one packed batch (each row: the prompt once, both answers, padding) equal
    transformers on each prompt + answer alone, and the three losses and the rewards equal TRL's
    formulas over those sums."""
    policy, ref = scratchlm.load(dirs["policy"]).model, scratchlm.load(dirs["ref"]).model
    hf_policy, hf_ref, tokenizer = _hf(dirs["policy"]), _hf(dirs["ref"]), _hf_tokenizer(dirs["policy"])
    batch = _batch()
    with torch.no_grad():
        ours = pair_logprobs(policy, batch)
    ids = [_trl_ids(tokenizer, p) for p in PAIRS]
    theirs = torch.tensor([_hf_sum(hf_policy, p, c) for p, c, _ in ids]
                          + [_hf_sum(hf_policy, p, r) for p, _, r in ids])
    theirs_ref = torch.tensor([_hf_sum(hf_ref, p, c) for p, c, _ in ids]
                              + [_hf_sum(hf_ref, p, r) for p, _, r in ids])
    assert (ours.double() - theirs).abs().max() <= TOL
    lengths = torch.tensor([len(c) for _, c, _ in ids] + [len(r) for _, _, r in ids], dtype=torch.float64)
    beta = 0.1
    chosen, rejected = (theirs - theirs_ref).chunk(2)
    delta = chosen - rejected
    n_c, n_r = lengths.chunk(2)
    expected = {"sigmoid": -torch.nn.functional.logsigmoid(beta * delta),
                "hinge": torch.relu(1 - beta * delta),
                "ipo": (chosen / n_c - rejected / n_r - 1 / (2 * beta)) ** 2}
    for kind, losses in expected.items():
        with torch.no_grad():
            out = DPOLoss(beta, kind, FrozenReference(ref))(policy, batch)
        assert out.count == len(PAIRS)
        assert abs(float(out.loss_sum) / len(PAIRS) - float(losses.mean())) <= TOL, kind
        assert abs(float(out.metrics["rewards/chosen"]) - float(beta * chosen.sum())) <= TOL
        assert abs(float(out.metrics["rewards/rejected"]) - float(beta * rejected.sum())) <= TOL
        assert abs(float(out.metrics["rewards/margins"]) - float(beta * delta.sum())) <= TOL
        assert int(out.metrics["rewards/accuracies"]) == int((delta > 0).sum())
    assert 0 < int((delta > 0).sum()) < len(PAIRS)  # the accuracy sees both outcomes here


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_step_zero_is_ln2_with_zero_rewards(dirs, mode):
    """Policy = reference (a frozen copy; LoRA with B = 0 and the adapters off): loss ln 2, rewards 0."""
    policy = scratchlm.load(dirs["policy"]).model
    if mode == "all":
        reference = FrozenReference(copy.deepcopy(policy))
    else:
        from scratchlm.finetune.lora import apply_lora

        apply_lora(policy, LoRAConfig(rank=4, alpha=8.0))
        reference = AdapterReference()
    with torch.no_grad():
        out = DPOLoss(0.1, "sigmoid", reference)(policy, _batch())
    assert abs(float(out.loss_sum) / out.count - math.log(2)) <= 1e-6
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(out.metrics[name])) <= 1e-6
    assert float(out.metrics["rewards/accuracies"]) == 0  # TRL counts chosen > rejected strictly


def test_beta_and_loss_type_are_checked():
    from scratchlm.errors import ConfigError

    x = torch.zeros(4)
    with pytest.raises(ConfigError, match="beta must be positive"):
        preference_loss(x, x, 0.0)
    with pytest.raises(ConfigError, match="unknown DPO loss"):
        preference_loss(x, x, 0.1, "kto")


def _config(**overrides) -> TrainConfig:
    base = {"batch_size": len(PAIRS), "lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0,
            "weight_decay": 0.01,
            "beta2": 0.999, "grad_clip": None, "max_steps": 1, "eval_every": 0, "eval_batches": 1,
            "precision": "fp32", "device": "cpu", "progress": False, "seed": 0}
    return TrainConfig(**{**base, **overrides})


def _ours_one_step(path: Path, optimizer: str, loss: str) -> dict[str, torch.Tensor]:
    lm = scratchlm.load(path)
    finetune_dpo(lm.model, lm.tokenizer, DPORecipe(PAIRS, [], [], beta=0.1, loss=loss, mode="all"),
                 _config(optimizer=optimizer))
    return {k: v.detach() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize(("optimizer", "loss"), [("sgd", "sigmoid"), ("adamw", "sigmoid"), ("sgd", "ipo"),
                                                 ("sgd", "hinge")])
def test_one_step_matches_trl_dpo_trainer(dirs, tmp_path, optimizer, loss):
    """One optimizer step from the same weights on the same pairs (one batch of all of them, so the
    order cannot differ): trl's DPOTrainer (fp32, constant lr, no warmup, no clipping) and ours give
    the same weights.  SGD exposes the gradient itself (Adam's first step is nearly lr · sign)."""
    trl = pytest.importorskip("trl", reason="trl (a dev extra) is the DPO parity oracle")
    from datasets import Dataset

    model = _hf(dirs["policy"])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS),
                         max_steps=1,
                         learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
                         adam_beta2=0.999, optim="sgd" if optimizer == "sgd" else "adamw_torch",
                         max_grad_norm=0.0, beta=0.1, loss_type=[loss], bf16=False, use_cpu=True,
                         report_to="none", save_strategy="no", max_length=None, seed=0, logging_steps=1,
                         disable_tqdm=True)
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                              for p in PAIRS])
    trl.DPOTrainer(model=model, args=args, train_dataset=data,
                   processing_class=_hf_tokenizer(dirs["policy"])).train()
    model.save_pretrained(tmp_path / "after")
    TOKENIZER.save(tmp_path / "after")
    theirs = scratchlm.load(tmp_path / "after").model.state_dict()
    start = scratchlm.load(dirs["policy"]).model.state_dict()
    ours = _ours_one_step(dirs["policy"], optimizer, loss)
    moved = max(float((theirs[k] - start[k]).abs().max()) for k in ours)
    assert moved > 1e-5  # the step did something
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert diff <= 1e-6 if optimizer == "sgd" else diff <= 1e-5


def test_lora_reference_is_the_policy_with_adapters_off(dirs, monkeypatch):
    """--train lora makes no second model: the reference is the same module with its adapters disabled,
    and after training it still scores exactly as the base model does."""
    import scratchlm.finetune.dpo as dpo

    monkeypatch.setattr(dpo.copy, "deepcopy",
                        lambda *_: pytest.fail("LoRA's reference must not copy the model"))
    lm = scratchlm.load(dirs["policy"])
    result = finetune_dpo(lm.model, lm.tokenizer, DPORecipe(PAIRS, [], [], mode="lora",
                                                            lora=LoRAConfig(rank=4, alpha=8.0)),
                          _config(max_steps=3, lr=1e-2))
    loss_fn = result.trainer.loss_fn
    assert isinstance(loss_fn, DPOLoss) and isinstance(loss_fn.reference, AdapterReference)
    batch = _batch()
    base = scratchlm.load(dirs["policy"]).model
    with torch.no_grad():
        reference = loss_fn.reference(lm.model, batch)
        tuned = pair_logprobs(lm.model, batch)
        expected = pair_logprobs(base, batch)
        with disable_adapters(lm.model):
            off = pair_logprobs(lm.model, batch)
    assert torch.equal(reference, off)
    assert (reference - expected).abs().max() <= TOL
    assert (tuned - expected).abs().max() > 1e-3  # the adapters learned something


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_precomputed_reference_gives_the_same_training(dirs, mode):
    runs = []
    for precompute in (False, True):
        lm = scratchlm.load(dirs["policy"])
        recipe = DPORecipe(PAIRS[:2] * 2, PAIRS[2:], [], mode=mode, precompute_ref=precompute,
                           lora=LoRAConfig(rank=4, alpha=8.0))
        result = finetune_dpo(lm.model, lm.tokenizer, recipe, _config(batch_size=2, max_steps=3, lr=1e-2))
        assert all(p.ref is not None for p in result.splits["train"]) == precompute
        runs.append((result.figures, lm.model.state_dict()))
    (a, wa), (b, wb) = runs
    assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-6
    assert abs(a["eval_rewards/margins"] - b["eval_rewards/margins"]) <= 1e-6
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_split_is_the_books_file_order():
    pairs = [PreferencePair(str(i), "a", "b") for i in range(1100)]
    train, val, test = book_split(pairs)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    firsts_and_lasts = (train[-1].prompt, test[0].prompt, test[-1].prompt, val[0].prompt)
    assert firsts_and_lasts == ("934", "935", "1044", "1045")


def test_chat_form_renders_prompt_and_completion():
    """prompt = render(prompt, generation prompt); completion = render(prompt + answer)[len(prompt):]."""
    item = {"prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    pair = to_pair(item, "item 1")
    assert pair.prompt == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert (pair.chosen, pair.rejected, pair.eos) == ("Yes.<|im_end|>\n", "No.<|im_end|>\n", False)
    implicit = to_pair({"chosen": item["prompt"] + item["chosen"],
                        "rejected": item["prompt"] + item["rejected"]}, "item 1")
    assert implicit == pair
    raschka = to_pair({"instruction": "Hi?", "input": "", "chosen": "Yes.", "rejected": "No."}, "item 1",
                      style=None)  # --template model: one user turn through the chat template
    assert raschka == pair
    alpaca = to_pair({"instruction": "Hi?", "input": "x", "chosen": "Yes.", "rejected": "No."}, "item 1")
    assert alpaca.prompt.endswith("### Input:\nx\n\n### Response:\n")
    assert alpaca.chosen == "Yes." and alpaca.eos


# --- the CLI ---------------------------------------------------------------------------------------


def _raschka_items(n: int = 20) -> list[dict]:
    return [{"instruction": f"Say the answer {i}.", "input": "tiny" if i % 2 else "",
             "output": "yes", "chosen": "The answer is yes.", "rejected": f"no {i}"} for i in range(n)]


def _trl_chat_lines(n: int = 12) -> str:
    lines = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"a tiny question {i}?"}]
        lines.append(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes, fine"}],
                                 "rejected": [{"role": "assistant", "content": f"no {i}"}]}))
    return "\n".join(lines) + "\n"


DPO = ("finetune", "dpo", "--model")
FAST = ["--max-steps", "2", "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--threads", "1"]


def test_cli_raschka_form_all_weights(dirs, tmp_path, run_cli):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(_raschka_items()))
    run = tmp_path / "run"
    code, out, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", run, *FAST)
    assert code == 0, err
    assert "17 train / 1 validation / 2 test pairs" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 2 and evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - math.log(2)) <= 1e-6
    for name in ("chosen", "rejected", "margins", "accuracies"):
        assert all(f"rewards/{name}" in r for r in train)
        assert all(f"train_rewards/{name}" in r and f"val_rewards/{name}" in r for r in evals)
    results = json.loads((run / "results.json").read_text())
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins",
                "eval_rewards/accuracies", "test_loss", "test_rewards/margins"):
        assert isinstance(results[key], float), key
    assert results["split_sizes"] == {"train": 17, "val": 1, "test": 2}
    assert (run / "loss.png").stat().st_size > 0
    config = json.loads((run / "config.json").read_text())
    assert "base_model" not in config  # every weight trained: the run holds them all
    tuned = scratchlm.load(run)
    assert tuned.model.config.vocab_size == TOKENIZER.vocab_size
    assert "finetune dpo" not in out and "reward margin" in out
    # the test prompts answered like instruction tuning's, for the evaluation to compare the two
    responses = [json.loads(line) for line in (run / "test_responses.jsonl").read_text().splitlines()]
    items = _raschka_items()
    assert [r["instruction"] for r in responses] == [item["instruction"] for item in items[-3:-1]]
    assert [r["reference"] for r in responses] == [item["chosen"] for item in items[-3:-1]]
    assert all(set(r) == {"instruction", "input", "reference", "response"} for r in responses)
    assert tuned.chat_template == PROMPT_STYLES["alpaca"].template


def test_cli_trl_chat_form_lora_precomputed(dirs, tmp_path, run_cli):
    data = tmp_path / "pairs.jsonl"
    data.write_text(_trl_chat_lines())
    run = tmp_path / "run"
    code, _, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", run,
                           "--train", "lora", "--lora-rank", "4", "--precompute-ref", "--loss", "ipo",
                           "--lr", "1e-3", *FAST)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["base_model"] == str(dirs["policy"].resolve()) and config["adapter"]["format"] == "peft"
    assert (run / "adapter" / "adapter_config.json").exists()
    results = json.loads((run / "results.json").read_text())
    assert results["loss_type"] == "ipo" and results["precompute_ref"] is True
    assert scratchlm.load(run).model is not None


@pytest.mark.parametrize("mode", ["all", "lora"])
def test_cli_resume_continues_exactly(dirs, tmp_path, run_cli, mode):
    """Ctrl-C after step 2 of 4, then --resume: the same results as the run never interrupted (the
    reference is the starting model again: a fresh copy, or the base under the adapters)."""
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(_raschka_items()))
    options = ["--data", data, "--train", mode, "--lora-rank", "4", "--lr", "1e-3", "--max-steps", "4",
               "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--threads", "1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_cli(*DPO, dirs["policy"], "--out", straight, *options)[0] == 0
    with ctrl_c_at(2):
        code, _, err = run_cli(*DPO, dirs["policy"], "--out", interrupted, *options)
    assert code == 130 and f"--resume {interrupted}" in err
    code, _, err = run_cli("finetune", "dpo", "--resume", interrupted)
    assert code == 0, err
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, interrupted))
    for key in ("eval_loss", "eval_rewards/margins", "test_loss", "test_rewards/chosen"):
        assert a[key] == b[key], key


# --- bad inputs ------------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("item", "message"), [
    ({"instruction": "x", "chosen": "", "rejected": "no"}, "the chosen completion is empty"),
    ({"instruction": "x", "chosen": "yes"}, "'rejected' is missing"),
    ({"chosen": "yes", "rejected": "no"}, "neither 'instruction' nor 'prompt'"),
])
def test_bad_pairs_exit_2(dirs, tmp_path, run_cli, item, message):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([*_raschka_items(5), item]))
    code, _, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", tmp_path / "r")
    assert code == 2
    line = _one_error_line(err)
    assert message in line and "pairs.json:6" in line


def test_bad_beta_and_foreign_reference_exit_2(dirs, tmp_path, run_cli):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(_raschka_items()))
    code, _, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", tmp_path / "a", "--beta", "0")
    assert code == 2 and "--beta must be positive" in _one_error_line(err)
    code, _, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", tmp_path / "b",
                           "--ref-model", dirs["other"], *FAST)
    assert code == 2 and "tokenizer differs" in _one_error_line(err)


def test_identical_answers_are_dropped_with_one_warning(dirs, tmp_path, run_cli):
    items = _raschka_items()
    for i in (0, 3, 5):
        items[i]["rejected"] = items[i]["chosen"]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(items))
    code, _, err = run_cli(*DPO, dirs["policy"], "--data", data, "--out", tmp_path / "r",
                           "--ref-model", dirs["ref"], *FAST)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 3 pairs have the same chosen and rejected answer; left out (no signal)"]
    assert "14 train / 1 validation / 2 test pairs" in err


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama"])
def test_packed_sums_equal_each_answer_alone(preset):
    """Learned positions (GPT-2) and rope (Llama) alike: the packed row scores each answer as the
    prompt + answer row alone does."""
    from scratchlm.models import build_model, from_preset
    from scratchlm.training.logprobs import sequence_logprobs

    torch.manual_seed(0)
    model = realistic_weights(build_model(from_preset(preset, vocab_size=TOKENIZER.vocab_size,
                                                      context_length=64)))
    encoded = [encode_pair(p, TOKENIZER) for p in PAIRS]
    with torch.no_grad():
        packed = pair_logprobs(model, PairCollate(TOKENIZER.eos_id)(EncodedPairs(encoded)))
        alone = []
        for side in ("chosen", "rejected"):
            for pair in encoded:
                answer = getattr(pair, side)
                ids = torch.tensor([pair.prompt + answer])
                targets = torch.tensor([[-100] * (len(pair.prompt) - 1) + answer + [-100]])
                alone.append(float(sequence_logprobs(model(ids), targets).sum[0]))
    # float32 sums of ~100 nats: rounding of a few ulps; a wrong position or mask moves them by nats
    torch.testing.assert_close(packed, torch.tensor(alone), rtol=2e-7, atol=TOL)


def test_packed_row_holds_the_prompt_once_and_both_answers():
    pair = encode_pair(PAIRS[0], TOKENIZER)
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    batch = PairCollate(TOKENIZER.eos_id)(EncodedPairs([pair, encode_pair(PAIRS[2], TOKENIZER)]))
    assert batch["input_ids"][0, :p + c + r].tolist() == pair.prompt + pair.chosen + pair.rejected
    assert batch["position_ids"][0, :p + c + r].tolist() == [*range(p + c), *range(p, p + r)]
    mask = batch["attention_mask"][0, 0]
    assert not mask[p + c:p + c + r, p:p + c].any() and mask[p + c:p + c + r, :p].all()
    rows, cols, targets, owners = batch["picks"]
    chosen = (rows == 0) & (owners == 0)
    rejected = (rows == 0) & (owners == 2)
    assert targets[chosen].tolist() == pair.chosen and cols[chosen].tolist() == list(range(p - 1, p + c - 1))
    assert targets[rejected].tolist() == pair.rejected
    assert cols[rejected].tolist() == [p - 1, *range(p + c, p + c + r - 1)]
    assert batch["lengths"][0::2].tolist() == [c, r]


# --- data parallelism ------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, policy: str, run_dir: str) -> None:
    from scratchlm.training import distributed

    torch.set_num_threads(1)
    ctx = distributed.init(rank, world, device="cpu", init_method=f"file://{init_file}")
    try:
        lm = scratchlm.load(policy)
        finetune_dpo(lm.model, lm.tokenizer, DPORecipe(PAIRS * 2, PAIRS, PAIRS[:3]),
                     _config(batch_size=2, max_steps=2, lr=1e-2, eval_every=1), run_dir=run_dir, dist=ctx)
    finally:
        distributed.shutdown(ctx)


@pytest.mark.slow
def test_two_processes_reduce_rewards_like_one(dirs, tmp_path):
    """2 gloo processes × 2 pairs give the single process's 4-pair steps: the loss, every reward sum
    (all-reduced with the loss) and the weights; the final splits are scored whole on both."""
    import time

    import torch.multiprocessing as mp

    run_dir = tmp_path / "ddp"
    args = (2, str(tmp_path / "init"), str(dirs["policy"]), str(run_dir))
    context = mp.start_processes(_ddp_worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the data-parallel workers did not finish")
    lm = scratchlm.load(dirs["policy"])
    single = finetune_dpo(lm.model, lm.tokenizer, DPORecipe(PAIRS * 2, PAIRS, PAIRS[:3]),
                          _config(batch_size=4, max_steps=2, lr=1e-2, eval_every=1), run_dir=tmp_path / "one")
    ddp = json.loads((run_dir / "results.json").read_text())
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/margins", "eval_rewards/accuracies",
                "test_loss", "test_rewards/rejected"):
        assert ddp[key] == pytest.approx(single.figures[key], abs=1e-5), key

    def train_records(path: Path) -> list[dict]:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["kind"] == "train"]

    for ours, theirs in zip(train_records(run_dir), train_records(tmp_path / "one"), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    weights = scratchlm.load(run_dir).model.state_dict()
    assert max(float((weights[k] - v).abs().max()) for k, v in lm.model.state_dict().items()) <= 1e-4
