"""``scratchlm chat`` driven as a terminal program through a pseudo-terminal (pexpect).

A tiny random Llama saved as a run dir; its context is long enough (16,384) that an answer with
``--ignore-eos`` is still streaming when the test presses Ctrl-C (the model decodes ~4,000 tokens
a second on a Zen 4 core, so 4,000 was not enough).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from scratchlm.checkpoint.io import save_run
from scratchlm.models import build_model, from_preset
from scratchlm.tokenizers.train_bpe import train_bpe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    text = (REPO / "src/scratchlm/generation/generate.py").read_text()
    tokenizer = train_bpe(text, 300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    config = from_preset("tiny-llama", vocab_size=300, context_length=16384)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "run"
    save_run(path, build_model(config), config, tokenizer)
    return path


def spawn(run_dir: Path, *options: str) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    # Ctrl-C must reach the child as a user's would: a test run started in the background by a
    # non-interactive shell ignores SIGINT, and the child would inherit that.
    return pexpect.spawn(sys.executable, ["-m", "scratchlm", "chat", "--model", str(run_dir), *options],
                         env=env, encoding="utf-8", timeout=30, cwd=str(REPO),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_chat_history_commands_ctrl_c_and_ctrl_d(run_dir, tmp_path):
    child = spawn(run_dir, "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "5")
    try:
        child.expect_exact(">>> ")
        child.sendline("/help")
        child.expect_exact("/save FILE")
        child.expect_exact(">>> ")
        child.sendline("hello there")
        child.expect_exact(">>> ")
        child.sendline("and again")
        child.expect_exact(">>> ")
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 5 messages")
        child.expect_exact(">>> ")
        messages = json.loads(saved.read_text())
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
        assert messages[0]["content"] == "Be brief." and messages[3]["content"] == "and again"
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.expect_exact(">>> ")
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 1 messages")
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D quits
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.signalstatus
    finally:
        if child.isalive():
            child.close(force=True)


def test_ctrl_c_stops_the_answer_but_not_the_chat(run_dir, tmp_path):
    child = spawn(run_dir, "--temperature", "0", "--max-new-tokens", "16000", "--ignore-eos")
    try:
        child.expect_exact(">>> ")
        child.sendline("tell me a long story")
        child.expect_exact("tell me a long story\r\n")  # the terminal's echo of the whole line
        # The tiny random model's answer is mostly blank lines, 16,000 tokens long: press Ctrl-C once
        # twenty of them have streamed (on a busy machine a fixed sleep could press it too early or,
        # with a fast model, after the answer ended).
        child.expect_exact("\r\n" * 20)
        child.sendintr()  # Ctrl-C
        child.expect_exact("[stopped]")
        child.expect_exact(">>> ")
        saved = tmp_path / "partial.json"
        child.sendline(f"/save {saved}")
        child.expect_exact("saved 2 messages")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, (child.signalstatus, child.before)
    finally:
        if child.isalive():
            child.close(force=True)
    assert json.loads(saved.read_text())[1]["role"] == "assistant"
