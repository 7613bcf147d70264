"""``scratchlm tokenizer {train,encode,decode}``: round trips, errors as one line + exit 2, fast start."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import shared_path
from scratchlm.data.corpora import read_corpus


@pytest.fixture
def gpt2_dir():
    return shared_path("data", "gpt2", "encoder.json").parent


def test_encode_decode_round_trip(run_cli, gpt2_dir, tmp_path):
    text = "Hello, I am\r\nhere 😀 <|endoftext|>\n"
    (tmp_path / "in.txt").write_bytes(text.encode("utf-8"))
    code, out, err = run_cli("tokenizer", "encode", "--tokenizer", gpt2_dir, "--allowed-special", "all",
                             tmp_path / "in.txt")
    assert code == 0, err
    assert out.endswith("\n") and "50256" in out.split()
    (tmp_path / "ids.txt").write_text(out, encoding="utf-8")
    code, out, _ = run_cli("tokenizer", "decode", "--tokenizer", gpt2_dir, tmp_path / "ids.txt")
    assert (code, out) == (0, text)


def test_encode_oracle(run_cli, gpt2_dir, tmp_path):
    (tmp_path / "in.txt").write_text("Every effort moves you", encoding="utf-8")
    code, out, _ = run_cli("tokenizer", "encode", "--tokenizer", gpt2_dir, tmp_path / "in.txt")
    assert (code, out) == (0, "6109 3626 6100 345\n")


@pytest.mark.parametrize("args, message", [
    (["encode", "--tokenizer", "{tmp}/missing"], "error: tokenizer not found"),
    (["encode", "--tokenizer", "{gpt2}", "{tmp}/nope.txt"], "error: input file not found"),
    (["encode", "--tokenizer", "{gpt2}", "{tmp}/special.txt"], "error: the text contains the special token"),
    (["encode", "--tokenizer", "{gpt2}", "--allowed-special", "<|im_end|>", "{tmp}/special.txt"],
     "error: allowed_special names '<|im_end|>', not a special token"),
    (["decode", "--tokenizer", "{gpt2}", "{tmp}/bad_ids.txt"],
     "error: item 2 of the input, 'x', is not a token id"),
    (["decode", "--tokenizer", "{gpt2}", "{tmp}/big_ids.txt"],
     "error: token id 99999 is not in the gpt2 vocabulary"),
    (["encode", "--tokenizer", "{tmp}/broken", "{tmp}/special.txt"], "error: "),
    (["encode", "--tokenizer", "{gpt2}", "{tmp}/latin1.txt"], "error: "),
])
def test_errors_are_one_line(run_cli, gpt2_dir, tmp_path, args, message):
    (tmp_path / "special.txt").write_text("a <|endoftext|> b", encoding="utf-8")
    (tmp_path / "bad_ids.txt").write_text("1 x 3", encoding="utf-8")
    (tmp_path / "big_ids.txt").write_text("1 99999", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "encoder.json").write_text("{", encoding="utf-8")
    code, out, err = run_cli("tokenizer", *[a.format(tmp=tmp_path, gpt2=gpt2_dir) for a in args])
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1 and " — " in err


def test_train_then_encode(run_cli, tmp_path):
    out_dir = tmp_path / "tok"
    code, out, err = run_cli("tokenizer", "train", "--data", "builtin:the-verdict", "--vocab-size", "300",
                             "--out", out_dir, "--no-progress")
    assert code == 0, err
    assert (out_dir / "tokenizer.json").is_file() and "300 tokens" in out
    text = read_corpus("builtin:the-verdict")[:500]
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    code, ids, _ = run_cli("tokenizer", "encode", "--tokenizer", out_dir, tmp_path / "in.txt")
    assert code == 0 and max(map(int, ids.split())) < 300
    (tmp_path / "ids.txt").write_text(ids, encoding="utf-8")
    assert run_cli("tokenizer", "decode", "--tokenizer", out_dir, tmp_path / "ids.txt")[:2] == (0, text)


def test_train_bad_data_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("tokenizer", "train", "--data", tmp_path / "none.txt", "--out", tmp_path / "t")
    assert code == 2 and err.startswith("error: data file not found")


def test_encode_stdin_without_heavy_imports(gpt2_dir):
    code = ("import sys; from scratchlm.cli import main; "
            f"rc = main(['tokenizer', 'encode', '--tokenizer', {str(gpt2_dir)!r}]); "
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers', 'tiktoken', 'numpy') "
            "if m in sys.modules]; "
            "print(rc, heavy)")
    done = subprocess.run([sys.executable, "-c", code], input=b"Hello, I am", capture_output=True, check=True)
    assert done.stdout.decode().split("\n")[:2] == ["15496 11 314 716", "0 []"]
