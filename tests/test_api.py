"""``scratchlm.load`` / ``LM``, fp16-packed CPU weights, and the ``scratchlm generate`` command."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import scratchlm
from scratchlm.errors import CheckpointError, ConfigError, UserError
from scratchlm.generation import SamplingParams, generate_ids
from scratchlm.generation.packed import fp16_packing_available, is_packed, pack_fp16
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers.char import CharTokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, gpt2_files_module):
    """A tiny random GPT-2 saved by transformers, with GPT-2's tokenizer files beside it."""
    import transformers
    directory = tmp_path_factory.mktemp("tiny-gpt2-hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights, so that greedy decoding does not just repeat one token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    for path in gpt2_files_module:
        shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture(scope="module")
def gpt2_files_module():
    from conftest import shared_path

    return shared_path("data", "gpt2", "encoder.json"), shared_path("data", "gpt2", "vocab.bpe")


def test_load_hf_dir_generates_like_transformers(hf_dir):
    import transformers
    lm = scratchlm.load(hf_dir, device="cpu")
    assert isinstance(lm, scratchlm.LM) and lm.device.type == "cpu" and lm.chat_template is None
    ids = lm.tokenizer.encode("Every effort moves you")
    assert ids == [6109, 3626, 6100, 345]
    assert lm.model(torch.tensor([ids])).shape == (1, 4, 50257)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                               max_new_tokens=12, do_sample=False, pad_token_id=50256)[0, 4:].tolist()
    completion = lm.complete(["Every effort moves you"], temperature=0, max_new_tokens=12, ignore_eos=True)[0]
    assert completion.token_ids == expected  # greedy parity through the production loader
    assert completion.text == lm.tokenizer.decode(expected)
    usage = (completion.prompt_tokens, completion.completion_tokens, completion.finish_reason)
    assert usage == (4, 12, "length")
    text = lm.generate("Every effort moves you", temperature=0, max_new_tokens=12, ignore_eos=True)
    assert text == completion.text
    params = SamplingParams(seed=3, max_new_tokens=10, top_k=40)
    s = lm.stream("Hello", params)
    assert "".join(s) == s.completion.text == lm.generate("Hello", params)


@pytest.mark.skipif(not fp16_packing_available(), reason="needs FBGEMM (x86 torch builds)")
def test_float16_on_cpu_packs_weights(hf_dir, tmp_path):
    lm = scratchlm.load(hf_dir, device="cpu", dtype="float16")
    assert is_packed(lm.model)
    reference = scratchlm.load(hf_dir, device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("Hello, I am")])
    with torch.no_grad():
        # What packing computes: fp16-rounded linear weights, fp32 math, and an fp32 embedding
        # (a new Parameter unties the LM head from the embedding, which stays unrounded).
        for module in reference.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.half().float())
        torch.testing.assert_close(lm.model(ids), reference.model(ids), atol=1e-4, rtol=1e-4)
    assert lm.generate("Hello", temperature=0, max_new_tokens=8, ignore_eos=True) == \
        reference.generate("Hello", temperature=0, max_new_tokens=8, ignore_eos=True)
    with pytest.raises(UserError, match="cannot be saved"):
        lm.save(tmp_path / "run")


@pytest.mark.skipif(not fp16_packing_available(), reason="needs FBGEMM (x86 torch builds)")
def test_packed_model_decodes_with_the_cache_and_batches():
    torch.manual_seed(0)
    model = build_model(from_preset("tiny-llama"))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    params = SamplingParams(temperature=0, max_new_tokens=10)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    pack_fp16(model)
    batched = generate_ids(model, prompts, params)
    assert [r.token_ids for r in batched] == [generate_ids(model, [p], params)[0].token_ids for p in prompts]


def random_llama(**overrides) -> torch.nn.Module:
    """tiny-llama (grouped-query attention) with weights large enough for clear greedy margins."""
    torch.manual_seed(0)
    model = build_model(from_preset("tiny-llama", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def fp16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """What fp16 packing computes, as a plain fp32 model: every linear weight rounded to fp16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):  # a new Parameter also unties the LM head
                module.weight = torch.nn.Parameter(module.weight.half().float())
    return rounded


# The fp16 mode against the fp32 model it came from.  Packing computes exactly (up to fp32 summation
# order, 1e-4) the fp32 model with its linear weights rounded to fp16; that rounding (relative error
# ≤ 2⁻¹¹ per weight) moves these tiny models' logits (|logit| up to ~5) by ~0.005, 4x under this bound.
FP16_LOGITS_ATOL = 0.02


@pytest.mark.skipif(not fp16_packing_available(), reason="needs FBGEMM (x86 torch builds)")
@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"qk_norm": True, "head_dim_override": 16}],
                         ids=["llama", "qwen2-biases", "qwen3-qk-norm"])
def test_fp16_mode_stacks_projections_and_stays_close_to_fp32(overrides):
    from scratchlm.generation.packed import PackedLinear

    model = random_llama(**overrides)
    reference, rounded = copy.deepcopy(model), fp16_rounded(model)
    pack_fp16(model)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.qkv_proj, PackedLinear) and attn.q_proj is None and attn.k_proj is None
    assert isinstance(mlp.gate_up_proj, PackedLinear) and mlp.gate_proj is None
    assert isinstance(model.lm_head, PackedLinear)  # the LM head too: the largest matrix of small models
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed, exact, fp32 = model(ids), rounded(ids), reference(ids)
        torch.testing.assert_close(packed, exact, atol=1e-4, rtol=1e-4)
        assert (packed - fp32).abs().max().item() <= FP16_LOGITS_ATOL
        # cached decoding in the packed model equals its own full recompute
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), packed, atol=1e-4, rtol=1e-4)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    greedy = [r.token_ids for r in generate_ids(model, prompts, params)]
    assert greedy == [r.token_ids for r in generate_ids(rounded, prompts, params)]
    for prompt, tokens in zip(prompts, greedy, strict=True):
        # fp32's greedy path, and how far ahead its best token is at each step: where that margin
        # is wider than 2 × the tolerance, fp16 must pick the same token.
        ids, margins = list(prompt), []
        with torch.no_grad():
            for _ in range(12):
                logits = reference(torch.tensor([ids]))[0, -1]
                top = logits.topk(2).values
                margins.append((top[0] - top[1]).item())
                ids.append(int(logits.argmax()))
        sure = next((i for i, m in enumerate(margins) if m < 2 * FP16_LOGITS_ATOL), len(margins))
        assert sure >= 3 and tokens[:sure] == ids[len(prompt):][:sure]


@pytest.mark.skipif(not fp16_packing_available(), reason="needs FBGEMM (x86 torch builds)")
def test_cli_dtype_float16_generates_what_fp32_does(run_cli, hf_dir):
    args = ["generate", "--model", hf_dir, "--prompt", "Every effort moves you", "--device", "cpu",
            "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]
    code, fp32, err = run_cli(*args)
    assert code == 0, err
    code, fp16, err = run_cli(*args, "--dtype", "float16")
    assert code == 0, err
    assert fp16 == fp32 and fp16


@pytest.mark.parametrize("dtype", ["int8", "int4", torch.qint8])
def test_quantized_dtypes_are_refused_in_one_line(run_cli, hf_dir, dtype):
    with pytest.raises(ConfigError, match="weights are not offered.*use float16") as info:
        scratchlm.load(hf_dir, device="cpu", dtype=dtype)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown dtype torch.int32 — use one of float32, bfloat16"):
        scratchlm.load(hf_dir, device="cpu", dtype=torch.int32)
    if isinstance(dtype, str):
        code, out, err = run_cli("generate", "--model", hf_dir, "--prompt", "hi", "--dtype", dtype)
        assert code == 2 and out == ""
        assert err.startswith(f"error: {dtype} weights are not offered") and err.count("\n") == 1


def test_run_dir_round_trip(tmp_path):
    text = "To be, or not to be, that is the question.\n"
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    config = from_preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)
    lm = scratchlm.LM(build_model(config).eval(), tokenizer, config)
    lm.save(tmp_path / "run")
    again = scratchlm.load(tmp_path / "run", device="cpu")
    assert type(again.tokenizer) is CharTokenizer
    options = {"temperature": 0.9, "seed": 11, "max_new_tokens": 20}
    assert again.generate("To be", **options) == lm.generate("To be", **options)


def test_load_errors_list_what_load_accepts(tmp_path):
    with pytest.raises(CheckpointError, match="not found — load accepts a run directory") as info:
        scratchlm.load(tmp_path / "missing" / "run")
    assert "hub id" in str(info.value) and "\n" not in str(info.value)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is a file, not a model I can open — load accepts"):
        scratchlm.load(weights)
    with pytest.raises(CheckpointError, match="holds no model I can open"):
        scratchlm.load(tmp_path)
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        scratchlm.load(tmp_path, dtype="int3")


def test_lm_without_tokenizer_and_bad_options():
    config = from_preset("tiny-gpt2")
    lm = scratchlm.LM(build_model(config).eval(), None, config)
    with pytest.raises(UserError, match="no tokenizer"):
        lm.generate("hi")
    lm.tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ConfigError, match="unknown sampling option 'temprature' — did you mean temperature"):
        lm.generate("ab", temprature=0.5)


def test_cli_bad_model_is_one_line_exit_2(run_cli, tmp_path):
    code, out, err = run_cli("generate", "--model", tmp_path / "nope", "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "load accepts" in err
    code, _, err = run_cli("generate", "--model", tmp_path, "--prompt", "hi", "--top-p", "2")
    assert code == 2 and err.startswith("error: top_p must be in (0, 1]")


def test_cli_streams_a_continuation(run_cli, hf_dir, monkeypatch):
    code, out, err = run_cli("generate", "--model", hf_dir, "--prompt", "Every effort moves you",
                             "--device", "cpu", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos",
                             "--echo")
    assert code == 0, err
    lm = scratchlm.load(hf_dir, device="cpu")
    expected = lm.generate("Every effort moves you", temperature=0, max_new_tokens=6, ignore_eos=True)
    newline = "" if expected.endswith("\n") else "\n"  # the output ends its last line
    assert out == "Every effort moves you" + expected + newline
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Every effort moves you"))
    code, out, _ = run_cli("generate", "--model", hf_dir, "--device", "cpu", "--temperature", "0",
                           "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0 and out == expected + newline


def test_cli_threads_option(run_cli, tmp_path):
    """--threads sets torch's CPU threads for every command that runs a model; < 0 is a one-line error."""
    text = "To be, or not to be, that is the question.\n"
    tokenizer = CharTokenizer.from_text(text)
    config = from_preset("tiny-gpt2", vocab_size=tokenizer.vocab_size)
    scratchlm.LM(build_model(config).eval(), tokenizer, config).save(tmp_path / "run")
    (tmp_path / "text.txt").write_text(text * 4)
    before = torch.get_num_threads()
    try:
        code, out, err = run_cli("generate", "--model", tmp_path / "run", "--prompt", "To", "--threads", "2",
                                 "--max-new-tokens", "3")
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for command in (["generate", "--model", tmp_path / "run", "--prompt", "To"],
                    ["eval", "perplexity", "--model", tmp_path / "run", "--data", tmp_path / "text.txt"],
                    ["pretrain", "--data", tmp_path / "text.txt", "--out", tmp_path / "new"]):
        code, out, err = run_cli(*command, "--threads", "-1")
        assert code == 2 and out == "", err
        assert err == "error: --threads must be 0 or more, got -1 — pass a thread count, e.g. --threads 1 " \
                      "(0 = one per core)\n"
    assert not (tmp_path / "new").exists()
    assert torch.get_num_threads() == before


def test_cli_device_and_serve_address_errors_are_one_line(run_cli, tmp_path):
    """A device this machine lacks, a port in use or out of range: exit 2 and one line, before the
    model loads (the model here does not exist, so reaching the load would print another error)."""
    import socket

    import uvicorn  # noqa: F401  (serve needs it: a declared dependency)
    for device, message in (("tpu", "unknown device 'tpu' — use cpu, cuda"),
                            ("cuda:7" if torch.cuda.is_available() else "cuda", "was asked for but")):
        with pytest.raises(ConfigError, match=message):
            scratchlm.load(tmp_path / "missing", device=device)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        in_use = f"cannot listen on 127.0.0.1:{port}: Address already in use"
        out_of_range = "port 99999 is out of range"
        sizes = "--max-batch and --prefill-tokens must be ≥ 1 and --max-queue ≥ 0"
        for options, message in ((["--port", str(port)], in_use), (["--port", "99999"], out_of_range),
                                 (["--prefill-tokens", "0"], sizes)):
            code, out, err = run_cli("serve", "--model", tmp_path / "missing", *options)
            assert (code, out) == (2, "") and err.startswith(f"error: {message} — ") and err.count("\n") == 1
