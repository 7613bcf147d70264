"""``scratchlm.load`` / ``LM``, fp16-packed CPU weights, and the ``scratchlm generate`` command."""

from __future__ import annotations

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
    transformers = pytest.importorskip("transformers")
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
    transformers = pytest.importorskip("transformers")
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


def test_run_dir_round_trip(tmp_path):
    pytest.importorskip("scratchlm.checkpoint.io")
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
    assert out == "Every effort moves you" + expected
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Every effort moves you"))
    code, out, _ = run_cli("generate", "--model", hf_dir, "--device", "cpu", "--temperature", "0",
                           "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0 and out == expected
