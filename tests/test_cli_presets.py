"""`scratchlm presets`: the preset table, counted from the configs alone (no torch)."""

from __future__ import annotations

import subprocess
import sys

from scratchlm.models import from_preset, list_presets


def test_presets_table_lists_every_preset_with_its_count(run_cli):
    code, out, err = run_cli("presets")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == "preset layers heads kv heads width context vocab parameters".split()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(list_presets())
    assert rows["gpt2-124m"][1:] == ["12", "12", "12", "768", "1024", "50257", "124,439,808"]
    assert rows["gpt2-1558m"][-1] == "1,557,611,200"
    for name, row in rows.items():
        config = from_preset(name)
        if config.arch == "ngram":  # counts come from the training text: none to show
            assert row[1:] == ["-", "-", "-", "-", str(config.ngram_order - 1), str(config.vocab_size), "-"]
        else:
            assert row[-1] == f"{config.num_parameters():,}"
    assert {"ngram-kn5", "ngram-laplace3"} <= set(rows)


def test_presets_filter_and_no_match(run_cli):
    code, out, _ = run_cli("presets", "--filter", "tiny")
    assert code == 0 and all(line.startswith(("preset", "tiny")) for line in out.splitlines())
    code, _, err = run_cli("presets", "--filter", "nothing-like-this")
    assert code == 2 and err.startswith("error: no preset name contains") and err.count("\n") == 1


def test_presets_does_not_import_torch():
    code = ("import sys; from scratchlm.cli import main; main(['presets']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
