"""Chat: templates and their loss masks, the context window, one-shot mode under a pipe, the REPL in a pty."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_export import make_run, sentencepiece_tokenizer

from toolkit import chat as C
from toolkit import generate as G
from toolkit.data.chat_template import encode_conversation, encode_prompt

REPO = Path(__file__).resolve().parent.parent

CONV = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Who is Lily?"},
    {"role": "assistant", "content": "Lily is a girl with a red ball."},
    {"role": "user", "content": "And Max?"},
    {"role": "assistant", "content": "Max is her dog."},
]


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp):
    root = tmp_path_factory.mktemp("runs")
    return {"base": make_run(root / "base", sp, max_seq_len=64),
            "sft": make_run(root / "sft", sp, max_seq_len=128, chat_template="llama2", seed=1)}


def test_llama2_template_and_mask(sp):
    ids, mask = encode_conversation(sp, CONV, "llama2")
    assert len(ids) == len(mask)
    assert ids.count(sp.bos_id) == 2 and ids.count(sp.eos_id) == 2 and ids[0] == sp.bos_id
    # the mask covers exactly the two answers and their EOS
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [s[-1] for s in spans] == [sp.eos_id, sp.eos_id]
    assert [sp.decode(s[:-1]) for s in spans] == ["Lily is a girl with a red ball.", "Max is her dog."]
    unmasked = [i for i, m in zip(ids, mask) if not m]
    assert sp.decode(unmasked[: unmasked.index(sp.bos_id, 1)]) == \
        "[INST] <<SYS>>\nYou are kind.\n<</SYS>>\n\nWho is Lily? [/INST]"
    assert sp.decode(unmasked[unmasked.index(sp.bos_id, 1):]) == "[INST] And Max? [/INST]"
    # a chat prompt is a prefix of the training sequence: history, then the next user turn's opening
    prompt = encode_prompt(sp, CONV[:4], "llama2")
    assert ids[: len(prompt)] == prompt and not mask[len(prompt) - 1] and all(mask[len(prompt):])


def test_qa_template(sp):
    ids, mask = encode_conversation(sp, CONV[1:3], "qa")
    assert all(mask) and ids[0] == sp.bos_id and ids[-1] == sp.eos_id
    assert sp.decode(ids) == "Q: Who is Lily?\nA: Lily is a girl with a red ball."
    prompt = encode_prompt(sp, CONV[1:2], "qa")
    assert sp.decode(prompt) == "Q: Who is Lily?\nA:"
    with pytest.raises(ValueError, match="alternate"):
        encode_conversation(sp, [CONV[2], CONV[1]], "llama2")
    with pytest.raises(ValueError, match="end with a user"):
        encode_prompt(sp, CONV[1:3], "llama2")


def test_stop_filter_holds_back_a_split_stop_text():
    f = G.StopText("\nQ:")
    out = [f.feed(p) for p in ["Max is", " here.\n", "Q", ": next"]]
    assert out == ["Max is", " here.", "", ""] and f.stopped and f.text == "Max is here."
    f = G.StopText("\nQ:")
    assert f.feed("a\n") == "a" and f.feed("b") == "\nb" and f.flush() == ""


def test_context_never_overflows_and_turn_not_duplicated(runs, sp):
    s = C.Session(C.load_target(runs["sft"]), G.Sampling(temperature=0), max_new_tokens=16, template="llama2",
                  system="Be brief.")
    for i in range(6):
        s.history += [{"role": "user", "content": f"question {i} about the ball"},
                      {"role": "assistant", "content": f"answer {i}: Lily had a red ball in the park"}]
    ids, notes = s.prompt_ids("what about Max the dog")
    assert len(ids) <= 128 - 16 and notes and "oldest turn" in notes[0]
    text = sp.decode(ids)
    assert text.count("what about Max the dog") == 1 and text.count("[/INST]") == len(s.history) // 2 + 1
    assert "question 0" not in text and len(s.history) < 12
    # a turn too long on its own keeps its end, with BOS first
    ids, notes = s.prompt_ids("ball " * 200 + "END")
    assert len(ids) <= 112 and ids[0] == sp.bos_id and sp.decode(ids).endswith("END [/INST]")
    assert s.history == [] and any("kept the last" in n for n in notes)


def test_two_turns_and_interrupt_in_process(runs):
    s = C.Session(C.load_target(runs["sft"]), G.Sampling(temperature=0), max_new_tokens=6, template="llama2")
    a1, _ = s.reply("Who is Lily?", lambda piece: None)
    _, st = s.reply("And Max?", lambda piece: None)
    assert [m["role"] for m in s.history] == ["user", "assistant"] * 2 and s.history[0]["content"] == "Who is Lily?"
    assert s.history[1]["content"] == a1.strip() and st.prompt_tokens > 10

    calls = []

    def stop_after_two(piece):
        calls.append(piece)
        if len(calls) == 2:
            raise KeyboardInterrupt

    s2 = C.Session(C.load_target(runs["base"]), G.Sampling(temperature=0), max_new_tokens=30)
    _, st = s2.reply("Lily had a", stop_after_two)
    assert st.stop == "interrupted" and len(calls) == 2
    full = []
    s2.reply("Lily had a", full.append)  # the session still works, and gives the same greedy text
    assert "".join(full).startswith("".join(calls))


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(LMKIT_CACHE=str(tmp_path / "cache"), PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", COLUMNS="200",
               PYTHONPATH=str(REPO))
    return env


def test_one_shot_under_a_pipe(runs, tmp_path):
    want = []
    s = C.Session(C.load_target(runs["base"]), G.Sampling(temperature=0), max_new_tokens=20)
    s.reply("Lily had a", want.append)
    cmd = [sys.executable, "-m", "toolkit", "chat", str(runs["base"]), "-t", "0", "-n", "20"]
    r = subprocess.run(cmd, input="Lily had a\n", capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(want) + "\n"  # only the generated text
    assert "tok/s" in r.stderr
    r = subprocess.run(cmd + ["--prompt", "Lily had a", "--echo"], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=120, stdin=subprocess.DEVNULL)
    assert r.stdout == "Lily had a" + "".join(want) + "\n"


NO_TORCH_CHAT = ("import atexit, sys\n"
                 "atexit.register(lambda: sys.stderr.write('torch loaded: %s\\n' % ('torch' in sys.modules)))\n"
                 "from toolkit.cli import main\n"
                 "main(sys.argv[1:])\n")


@pytest.mark.parametrize("tie", [True, False])
def test_chat_on_a_cpu_runs_without_torch_and_says_the_same(sp, tmp_path, tie):
    """`lmkit chat --device cpu` on a run folder and on its .bin (v0 and int8 v2) never imports torch (most of a
    short reply's time) and gives the torch-loaded model's text, greedy and sampled with a seed."""
    from toolkit.export import export_run

    run = make_run(tmp_path / "run", sp, max_seq_len=64, n_kv_heads=2, tie=tie, seed=3)
    export_run(run, tmp_path / "bin" / "model.bin", "v0")
    export_run(run, tmp_path / "q8" / "model.bin", "v2")
    for target in (run, tmp_path / "bin" / "model.bin", tmp_path / "q8" / "model.bin"):
        torch_model = C.load_target(target).model  # the default: the torch Model
        assert type(torch_model).__module__ == "toolkit.models.llama"
        numpy_model = C.load_target(target, device="cpu", numpy=True).model
        assert type(numpy_model).__name__ == "NumpyLlama" and numpy_model.num_params() == torch_model.num_params()
        greedy = G.Sampling(temperature=0)
        assert G.generate(numpy_model, [1, 5, 6], 20, greedy) == G.generate(torch_model, [1, 5, 6], 20, greedy)
        for flags, sampling in ((["-t", "0"], G.Sampling(temperature=0)),
                                (["-t", "1", "--seed", "5"], G.Sampling(temperature=1.0, top_p=0.9, seed=5))):
            want = []
            C.Session(C.load_target(target), sampling, max_new_tokens=12).reply("Lily had a", want.append)
            r = subprocess.run([sys.executable, "-c", NO_TORCH_CHAT, "chat", str(target), "--device", "cpu",
                                "--prompt", "Lily had a", "-n", "12", *flags], capture_output=True,
                               env=_env(tmp_path), timeout=120, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr
            # bytes: a random model's text can hold a "\r", which text mode would turn into "\n"
            assert r.stdout.decode() == "".join(want) + "\n" and "".join(want).strip()
            assert b"torch loaded: False" in r.stderr


def test_chat_device_auto_loads_torch_only_where_a_gpu_could_be(runs, monkeypatch):
    probe = C.accelerator_possible
    monkeypatch.setattr(C, "accelerator_possible", lambda: False)
    assert type(C.load_target(runs["base"], device="auto", numpy=True).model).__name__ == "NumpyLlama"
    monkeypatch.setattr(C, "accelerator_possible", lambda: True)  # torch decides: on this machine, the CPU
    assert type(C.load_target(runs["base"], device="auto", numpy=True).model).__name__ == "Model"
    monkeypatch.setattr(C.sys, "platform", "linux")
    monkeypatch.setattr(C.os.path, "exists", lambda p: p == "/dev/nvidiactl")
    assert probe()
    monkeypatch.setattr(C.os.path, "exists", lambda p: False)
    assert not probe()


def test_weights_the_numpy_model_cannot_take_get_the_torch_loaders_error(sp, tmp_path):
    """A run folder whose weights do not fit its recipe, or are no safetensors file: the numpy path steps aside
    and the user sees the torch loader's one-line error, as before."""
    import shutil

    from toolkit.errors import UserError

    run = make_run(tmp_path / "run", sp, max_seq_len=64)
    other = make_run(tmp_path / "other", sp, max_seq_len=64, dim=32)
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    with pytest.raises(UserError, match="has shape .* the recipe's model needs"):
        C.load_target(run, device="cpu", numpy=True)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        C.load_target(run, device="cpu", numpy=True)


def test_empty_stdin_is_a_user_error(runs):
    from typer.testing import CliRunner

    from toolkit.cli import build_app
    from toolkit.errors import UserError

    result = CliRunner().invoke(build_app(), ["chat", str(runs["base"]), "-n", "5"], input="")
    assert isinstance(result.exception, UserError) and "stdin is empty" in str(result.exception)


def test_repl_two_turns_in_a_pty(runs, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "toolkit", "chat", str(runs["sft"]), "-t", "0", "-n", "8"],
                          env=_env(tmp_path), encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect("chat template 'llama2'")
        child.expect("you>")
        child.sendline("Who is Lily?")
        child.expect("assistant: ")
        child.expect(r"tok/s")
        child.expect("you>")
        child.sendline("/help")
        child.expect("/reset")
        child.expect("you>")
        child.sendline("/temperature 0.5")
        child.expect(r"temperature 0\.5")
        child.expect("you>")
        child.sendline("And Max?")
        child.expect(r"tok/s")
        child.expect("you>")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect("you>")
        child.sendcontrol("c")  # at the prompt: clears the line, does not leave
        child.expect("you>")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "cache" / "chat_history").read_text()
    assert "Who is Lily?" in history and "And Max?" in history
