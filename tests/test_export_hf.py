"""Hugging Face export and import: the exported folder loads offline with transformers' Auto classes and gives
lmkit's logits, greedy tokens, token ids and chat-template ids; imports round-trip bitwise; sharded folders
import; families transformers has no class for are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lmkit
from helpers_export import make_run, sentencepiece_tokenizer

from toolkit import export as ex
from toolkit.data.chat_template import encode_conversation, encode_prompt
from toolkit.errors import UserError
from toolkit.generate import Sampling, generate
from toolkit.run import load_run

TEXTS = ["Lily had a ball.", "  two  spaces  here ", "Zoë and José at the café!", "日本語 text 🤖", "a\nb\n\n c",
         "x=1, y=22; z? (yes) [no] {maybe}", " lead", "trail ", "tab\there", ""]
CONVERSATION = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who had a ball?"},
                {"role": "assistant", "content": "Lily had a red ball."}, {"role": "user", "content": "And Max?"},
                {"role": "assistant", "content": " Max had  a kite. "}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            "tied": make_run(root / "tied", tok, train_steps=40),
            "gqa": make_run(root / "gqa", tok, n_kv_heads=2, tie=False, seed=1, train_steps=40),
            "llama2": make_run(root / "llama2", tok, chat_template="llama2", seed=2),
            "qa": make_run(root / "qa", tok, chat_template="qa", seed=3),
        }
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, runs):
    root = tmp_path_factory.mktemp("hf")
    return {name: ex.export_hf(run, root / name).path for name, run in runs.items()}


def ids_of(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_folder_contents_and_config(exported, runs):
    folder = exported["gqa"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["max_position_embeddings"]) == (64, 2, 4, 2, 16, 64)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "float32" and cfg["rms_norm_eps"] == 1e-5
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    from safetensors import safe_open

    with safe_open(str(exported["tied"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    card = (folder / "README.md").read_text()
    assert "parameters" in card and "[model]" in card and "library_name: transformers" in card


@pytest.mark.parametrize("name", ["tied", "gqa"])
def test_logits_and_greedy_tokens_equal_lmkit(exported, runs, tok, name, one_thread):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported[name]).eval()
    run = load_run(runs[name])
    prompt = [tok.bos_id] + tok.encode("Lily had a kite. It was day 7. She")
    with torch.no_grad():
        ours = run.model(torch.tensor([prompt]))[0]
        theirs = hf(torch.tensor([prompt])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    want = generate(run.model, prompt, 24, Sampling(temperature=0), stop_ids=(tok.eos_id,))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    if out and out[-1] == tok.eos_id:
        out = out[:-1]
    assert out == want and len(want) > 3


def test_auto_tokenizer_gives_the_run_tokenizer_ids(exported, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported["tied"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.vocab_size) == (1, 2, 0, tok.vocab_size)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)), repr(text)
    assert hf("Lily had a ball.").input_ids == [tok.bos_id] + tok.encode("Lily had a ball.")


@pytest.mark.parametrize("template", ["llama2", "qa"])
def test_chat_template_renders_what_lmkit_trained_on(exported, tok, template):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported[template])
    assert hf.chat_template
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        want, _ = encode_conversation(tok, messages, template)
        assert ids_of(hf.apply_chat_template(messages, tokenize=True)) == want
        prompt = messages[:-1]
        got = ids_of(hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
        assert got == encode_prompt(tok, prompt, template)
    assert json.loads((exported[template] / "tokenizer_config.json").read_text())["chat_template"] == hf.chat_template


def test_import_round_trips_bitwise(exported, runs, tmp_path):
    for name in ("tied", "gqa"):
        back = load_run(ex.import_hf(exported[name], tmp_path / name))
        run = load_run(runs[name])
        assert back.recipe.model == run.recipe.model and back.tokenizer.fingerprint == run.tokenizer.fingerprint
        a, b = run.model.state_dict(), back.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = load_run(tmp_path / "tied")
    assert back.recipe.name == "tiny" and back.step == 40


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_export(runs, tmp_path, dtype):
    folder = ex.export_hf(runs["gqa"], tmp_path / "hf", dtype).path
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == {"f16": "float16",
                                                                               "bf16": "bfloat16"}[dtype]
    back, run = load_run(ex.import_hf(folder, tmp_path / "back")), load_run(runs["gqa"])
    for k, v in run.model.state_dict().items():
        rounded = v.to(torch.float16 if dtype == "f16" else torch.bfloat16).float()
        assert torch.equal(back.model.state_dict()[k], rounded), k


def test_sharded_foreign_folder_imports(exported, runs, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["gqa"])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")  # transformers' own writer: no lmkit metadata
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "sharded" / "tokenizer.model").write_bytes((exported["gqa"] / "tokenizer.model").read_bytes())
    back, run = load_run(ex.import_hf(tmp_path / "sharded", tmp_path / "run")), load_run(runs["gqa"])
    assert back.recipe.model.n_kv_heads == 2 and not back.recipe.model.tie_embeddings
    for k, v in run.model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k


def test_cli_export_import_and_errors(runs, exported, tmp_path, capsys):
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(tmp_path / "hf"), "--format", "hf",
                         "--dtype", "bf16")
    assert code == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(tmp_path / "hf"), "--format", "hf")
    assert code == 1 and "already exists; pass --force" in err
    code, _, err = lmkit(capsys, "export", str(runs["tied"]), "-o", str(tmp_path / "x"), "--format", "hf",
                         "--dtype", "q8_0")
    assert code == 1 and "--dtype 'q8_0'" in err and "Traceback" not in err
    code, _, err = lmkit(capsys, "export", str(exported["gqa"]), "-o", str(tmp_path / "imp"))
    assert code == 0 and (tmp_path / "imp" / "recipe.toml").is_file()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    code, _, err = lmkit(capsys, "export", str(tmp_path / "broken"), "-o", str(tmp_path / "imp2"))
    assert code == 1 and "only llama folders import" in err and len(err.strip().splitlines()) == 1


def family_run(folder, family: str, model: dict):
    from toolkit import models
    from toolkit import recipe as recipe_lib
    from toolkit.run import save_weights
    from toolkit.tokenizers.bytes import BytesTokenizer

    tok = BytesTokenizer(0)
    recipe = recipe_lib.from_dict({"name": family, "model": {"family": family, **model},
                                   "tokenizer": {"kind": "bytes", "n_sentinels": 0}}, "test")
    folder.mkdir(parents=True)
    tok.save(folder / "tokenizer")
    save_weights(models.build(recipe.model, tok.vocab_size), folder / "model.safetensors")
    recipe_lib.save(recipe, folder / "recipe.toml")
    return folder


@pytest.mark.parametrize("family,model", [
    ("attractor", {"dim": 16, "n_waves": 2, "window": 4, "steps": 2, "max_seq_len": 8}),
    ("pgpt", {"dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16, "max_seq_len": 16}),
    ("gpt2", {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 16, "resonance": True, "n_frequencies": 4}),
])
def test_families_without_a_transformers_class(tmp_path, capsys, family, model):
    run = family_run(tmp_path / family, family, model)
    for fmt in ("hf", "gguf"):
        code, _, err = lmkit(capsys, "export", str(run), "-o", str(tmp_path / f"out.{fmt}"), "--format", fmt)
        assert code == 1 and "model class" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match="only llama-family"):
        ex.export_hf(run, tmp_path / "direct")


def test_chat_on_a_hugging_face_folder_prints_what_the_run_prints(runs, exported, capsys):
    args = ["--prompt", "Lily had a", "--temperature", "0", "-n", "20", "--device", "cpu"]
    code, want, err = lmkit(capsys, "chat", str(runs["gqa"]), *args)
    assert code == 0 and want.strip(), err
    code, got, err = lmkit(capsys, "chat", str(exported["gqa"]), *args)
    assert code == 0, err
    assert got == want
