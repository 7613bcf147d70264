"""``scratchlm convert``: Hugging Face <-> run dir round trips with transformers' logits, GGUF -> run dir,
and the refusals that keep an existing directory safe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import scratchlm
from conftest import PARITY_ATOL, realistic_weights
from scratchlm.models.config import ModelConfig
from scratchlm.models.transformer import Transformer
from scratchlm.tokenizers.train_bpe import train_bpe

TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM with llama3 rope scaling and a tokenizer with a chat template."""
    torch.manual_seed(0)
    # 270 tokens for a model of 300: the embedding is padded past the vocabulary, as real ones often are
    tok = train_bpe("a tiny corpus for a tiny tokenizer, tiny and fine. " * 10, 270,
                    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    specials = tok.special_tokens
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=specials["<|im_start|>"], eos_token_id=specials["<|im_end|>"],
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = realistic_weights(transformers.LlamaForCausalLM(config))
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = TEMPLATE
    tok.save(path)
    return path


def logits_of(directory: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_hf_to_run_to_hf_keeps_logits(hf_dir, tmp_path, run_cli):
    run, back = tmp_path / "run", tmp_path / "back"
    code, out, err = run_cli("convert", hf_dir, run)  # default: to a run dir
    assert code == 0, err
    assert out.startswith(f"wrote {run} (run dir:")
    lm = scratchlm.load(run, device="cpu")
    assert lm.chat_template == TEMPLATE and lm.tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        ours = lm.model(IDS)
    expected = logits_of(hf_dir)
    assert (ours - expected).abs().max().item() <= PARITY_ATOL

    code, out, err = run_cli("convert", run, back)  # default from a run dir: Hugging Face
    assert code == 0, err
    assert out.startswith(f"wrote {back} (Hugging Face:")
    assert (logits_of(back) - expected).abs().max().item() <= PARITY_ATOL
    generation = json.loads((back / "generation_config.json").read_text())
    assert generation["eos_token_id"] == lm.tokenizer.special_tokens["<|im_end|>"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    messages = [{"role": "user", "content": "a tiny question"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        lm.chat_prompt(messages)


def test_explicit_format_and_dtype(hf_dir, tmp_path, run_cli):
    out = tmp_path / "bf16"
    code, _, err = run_cli("convert", hf_dir, out, "--to", "hf", "--dtype", "bfloat16")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_refuses_to_overwrite(hf_dir, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, err = run_cli("convert", hf_dir, out)
    assert (code, stdout) == (2, "")
    assert err.startswith("error: ") and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"

    code, _, err = run_cli("convert", hf_dir, out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("convert", hf_dir, tmp_path / "file", "--force")
    assert code == 2 and "is a file" in err
    holder = tmp_path / "holder"
    shutil.copytree(hf_dir, holder / "model")
    code, _, err = run_cli("convert", holder / "model", holder, "--force")
    assert code == 2 and "holds the model being converted" in err
    assert (holder / "model" / "model.safetensors").is_file()
    code, _, err = run_cli("convert", tmp_path / "absent", tmp_path / "new")
    assert code == 2 and err.startswith("error: ") and "not found" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("preset", ["tiny-lstm", "ngram-kn5"])
def test_recurrent_and_ngram_models_have_no_hf_format(preset, tmp_path, run_cli):
    from scratchlm.models import build_model, from_preset
    from scratchlm.models.ngram_module import NGramLM
    from scratchlm.tokenizers.char import CharTokenizer

    tokenizer = CharTokenizer.from_text("to be or not to be")
    config = from_preset(preset, vocab_size=tokenizer.vocab_size)
    ids = tokenizer.encode("to be or not to be")
    model = NGramLM.fit(config, ids) if config.arch == "ngram" else build_model(config)
    scratchlm.LM(model, tokenizer, config).save(tmp_path / "run")
    code, out, err = run_cli("convert", tmp_path / "run", tmp_path / "hf", "--to", "hf")
    assert (code, out) == (2, "")
    assert err.startswith(f"error: models of arch '{config.arch}' have no Hugging Face checkpoint format")
    assert err.count("\n") == 1 and "convert --to run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written, no temporaries


def _tiny_gguf_vocab():
    """Metadata of a tiny byte-level vocabulary with a chat template, for write_model."""
    import gguf

    from scratchlm.tokenizers.bpe import bytes_to_token

    tokens = [bytes_to_token(bytes([b])) for b in range(256)] + ["he", "Ġt", "<|im_start|>", "<|im_end|>"]

    def vocab(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * 258 + [gguf.TokenType.CONTROL] * 2)
        writer.add_token_merges(["h e", "Ġ t"])
        writer.add_eos_token_id(259)
        writer.add_chat_template(TEMPLATE)

    return len(tokens), vocab


def test_gguf_to_run(tmp_path, run_cli):
    import test_gguf  # its helpers write tiny GGUF files

    n_tokens, vocab = _tiny_gguf_vocab()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(test_gguf.TINY, vocab_size=n_tokens))).eval()
    path = test_gguf.write_model(tmp_path / "m.gguf", model, "llama", "Q8_0", metadata=vocab)
    code, _, err = run_cli("convert", path, tmp_path / "run")
    assert code == 0, err
    source, converted = scratchlm.load(path, device="cpu"), scratchlm.load(tmp_path / "run", device="cpu")
    ids = torch.tensor([[1, 2, 3, 256, 257, 258]])
    with torch.no_grad():
        assert torch.equal(source.model(ids), converted.model(ids))
    assert converted.chat_template == TEMPLATE and converted.tokenizer.eos_token == "<|im_end|>"
    assert converted.tokenizer.encode("he the") == source.tokenizer.encode("he the")


def test_gguf_to_hf_loads_in_transformers_with_the_same_logits(tmp_path, run_cli):
    """README: ``scratchlm convert MODEL.gguf DIR --to hf``.  GGUF stores q/k rows permuted for
    llama.cpp's RoPE; the Hugging Face checkpoint must hold them un-permuted, which only weights of
    realistic scale (attention far from uniform) can show."""
    import test_gguf  # its helpers write tiny GGUF files

    n_tokens, vocab = _tiny_gguf_vocab()
    model = realistic_weights(Transformer(ModelConfig(**dict(test_gguf.TINY, vocab_size=n_tokens))))
    path = test_gguf.write_model(tmp_path / "m.gguf", model, "llama", "F32", metadata=vocab)
    code, out, err = run_cli("convert", path, tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'hf'} (Hugging Face:")
    ids = torch.tensor([[1, 2, 3, 256, 257, 258, 40, 41, 42, 7]])
    with torch.no_grad():
        expected = model(ids)
        assert (scratchlm.load(path, device="cpu").model(ids) - expected).abs().max().item() <= PARITY_ATOL
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (theirs(ids).logits - expected).abs().max().item() <= PARITY_ATOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("he the", add_special_tokens=False) == \
        scratchlm.load(path, device="cpu").tokenizer.encode("he the")
