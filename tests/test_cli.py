import json
import subprocess
import sys

import numpy as np
from conftest import lmkit

from toolkit import __version__, tokenizers
from toolkit.shards.format import ShardSet


def test_version_and_help(capsys):
    code, out, _ = lmkit(capsys, "--version")
    assert code == 0 and out.strip() == f"lmkit {__version__}"
    for cmd in ("data", "vocab", "pretokenize", "recipes"):
        code, out, _ = lmkit(capsys, cmd, "--help")
        assert code == 0 and "Usage" in out


def test_data_vocab_pretokenize_pipeline(capsys, tmp_path):
    c, t, s = tmp_path / "corpus", tmp_path / "tok", tmp_path / "shards"
    assert lmkit(capsys, "data", "synthetic", "-o", str(c), "--stories", "400")[0] == 0
    code, _, err = lmkit(capsys, "vocab", str(c), "-o", str(t), "--vocab-size", "400")
    assert code == 0, err
    code, _, err = lmkit(capsys, "pretokenize", str(c), "--tokenizer", str(t), "-o", str(s), "--workers", "2")
    assert code == 0, err
    shards, tok = ShardSet(s), tokenizers.load(t)
    shards.check_tokenizer(tok)
    first = json.loads((c / "train.jsonl").read_text().splitlines()[0])["text"]
    expect = [tok.bos_id] + tok.encode(first)
    np.testing.assert_array_equal(shards.splits["train"][0][: len(expect)], expect)
    code, _, err = lmkit(capsys, "vocab", str(c), "-o", str(t))
    assert code == 1 and "already holds a tokenizer" in err
    code, _, err = lmkit(capsys, "vocab", "-o", str(tmp_path / "gpt2"), "--kind", "tiktoken", "--encoding", "gpt2")
    assert code == 0, err


def test_user_errors_are_one_line_without_traceback(capsys, tmp_path):
    cases = [
        (["data", str(tmp_path / "missing"), "-o", str(tmp_path / "x")], "data source not found"),
        (["vocab", str(tmp_path), "-o", str(tmp_path / "t")], "is not a corpus folder"),
        (["pretokenize", str(tmp_path / "nope"), "-t", str(tmp_path), "-o", str(tmp_path / "s")], "corpus not found"),
        (["vocab", "-o", str(tmp_path / "t2"), "--kind", "wordpiece"], "kind: expected one of"),
        (["data", "synthetic", "-o", str(tmp_path / "v"), "--val-fraction", "1.5"], "val_fraction"),
    ]
    for args, message in cases:
        code, out, err = lmkit(capsys, *args)
        assert code == 1, args
        assert message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3  # one logical line (Rich may wrap it)


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--debug", "data", str(tmp_path / "missing"), "-o",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "toolkit", "data", str(tmp_path / "missing"), "-o",
                           str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "error: data source not found" in proc.stderr


def test_a_subcommand_imports_only_its_own_module():
    # `lmkit chat` builds only chat: a one-shot reply does not pay for importing train, eval, serve, audio...
    code = ("import sys; from toolkit.cli import main\n"
            "try:\n    main(['chat', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('toolkit.cli.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: lmkit chat" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "['toolkit.cli.chat']"


def test_root_help_lists_every_subcommand_and_an_unknown_one_is_refused(capsys):
    from toolkit.cli import COMMANDS

    code, out, _ = lmkit(capsys, "--help")
    assert code == 0
    for name in COMMANDS:
        assert name in out
    code, out, err = lmkit(capsys, "-q", "chatt", "x")
    assert code == 2 and "No such command" in out + err
    code, out, _ = lmkit(capsys, "-q", "recipes", "--help")  # root options before the subcommand
    assert code == 0 and "Usage" in out
