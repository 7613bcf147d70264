import subprocess
import sys

from scratchlm.data.corpora import read_corpus


def test_help_lists_commands(run_cli):
    code, out, _ = run_cli("--help")
    assert code == 0
    for name in ("pretrain", "generate", "tokenizer", "presets"):
        assert name in out


def test_unknown_command_suggests(run_cli):
    code, _, err = run_cli("pretrian")
    assert code == 2
    assert err.startswith("error: unknown command 'pretrian'")
    assert "pretrain" in err


def test_help_does_not_import_torch():
    code = "import sys; from scratchlm.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_builtin_corpora():
    assert len(read_corpus("builtin:the-verdict")) == 20479
    assert len(read_corpus("builtin:tinyshakespeare")) == 1115394


def test_missing_and_empty_corpus(tmp_path):
    import pytest

    from scratchlm.errors import DataError

    with pytest.raises(DataError, match="not found"):
        read_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="unknown builtin"):
        read_corpus("builtin:nope")
