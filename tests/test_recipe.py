from pathlib import Path

import pytest
from conftest import lmkit

from toolkit import recipe
from toolkit.errors import UserError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_shipped_inner_arianna_loads_with_llama2c_shape():
    r = recipe.load("inner_arianna")
    assert r.model.family == "llama"
    assert (r.model.dim, r.model.n_layers, r.model.n_heads, r.model.max_seq_len) == (288, 6, 6, 256)
    assert r.model.ffn_dim == 768  # llama2.c's hidden for dim 288, multiple_of 32
    assert r.tokenizer.kind == "sentencepiece" and r.tokenizer.vocab_size == 4096


def test_every_shipped_recipe_loads_and_round_trips_through_toml(tmp_path):
    for path in recipe.shipped():
        r = recipe.load(path)
        out = tmp_path / path.name
        recipe.save(r, out)
        assert recipe.load(out) == r


def test_unknown_key_names_file_table_and_key(tmp_path):
    p = write(tmp_path, '[model]\nfamily = "llama"\n[train]\nlearning_rate = 1e-3\n')
    with pytest.raises(UserError, match=r"r\.toml \[train\]: unknown key 'learning_rate'.*lr"):
        recipe.load(p)


def test_wrong_type_is_an_error(tmp_path):
    p = write(tmp_path, '[model]\nfamily = "llama"\n[train]\nbatch_size = "big"\n')
    with pytest.raises(UserError, match=r"\[train\]\.batch_size: expected int, got 'big'"):
        recipe.load(p)


def test_impossible_value_dim_not_divisible_by_heads(tmp_path):
    p = write(tmp_path, '[model]\nfamily = "llama"\ndim = 100\nn_heads = 6\n')
    with pytest.raises(UserError, match=r"\[model\]\.n_heads: expected a divisor of dim=100, got 6"):
        recipe.load(p)


def test_unknown_family(tmp_path):
    p = write(tmp_path, '[model]\nfamily = "mamba"\n')
    with pytest.raises(UserError, match="unknown family 'mamba'"):
        recipe.load(p)


def test_set_overrides_with_type_checking():
    r = recipe.load("inner_arianna", ["train.lr=3e-4", "model.dim=96", "model.n_heads=4", "model.n_kv_heads=4", "train.compile=true",
                                      "data.source=hf:roneneldan/TinyStories", "tokenizer.encoding=123"])
    assert r.train.lr == 3e-4 and r.model.dim == 96 and r.train.compile is True
    assert r.data.source == "hf:roneneldan/TinyStories"
    assert r.tokenizer.encoding == "123"  # a string key keeps its text
    with pytest.raises(UserError, match=r"\[train\]\.max_iters: expected int"):
        recipe.load("inner_arianna", ["train.max_iters=lots"])
    with pytest.raises(UserError, match="expected table.key=value"):
        recipe.load("inner_arianna", ["train.lr"])
    with pytest.raises(UserError, match="unknown key 'nope'"):
        recipe.load("inner_arianna", ["train.nope=1"])


def test_scientific_integer_is_accepted_for_int_fields():
    assert recipe.load("inner_arianna", ["train.max_iters=2e3"]).train.max_iters == 2000


def test_recipes_cli_list_show_copy(capsys, tmp_path):
    code, out, err = lmkit(capsys, "recipes", "list")
    assert code == 0 and "inner_arianna" in err + out
    code, out, _ = lmkit(capsys, "recipes", "show", "inner_arianna", "--set", "train.lr=0.001")
    assert code == 0 and "lr = 0.001" in out and "[model]" in out
    dest = tmp_path / "my.toml"
    assert lmkit(capsys, "recipes", "copy", "inner_arianna", str(dest))[0] == 0
    assert recipe.load(dest).name == "inner_arianna"
    code, _, err = lmkit(capsys, "recipes", "copy", "inner_arianna", str(dest))
    assert code == 1 and "already exists" in err and "Traceback" not in err
    code, _, err = lmkit(capsys, "recipes", "show", "no_such_recipe")
    assert code == 1 and "recipe not found: no_such_recipe" in err


def test_set_keeps_a_number_looking_value_as_text_for_a_string_model_key():
    from toolkit import recipe as recipe_lib
    from toolkit.errors import UserError

    r = recipe_lib.load("t5_ascii_cpu", ["model.decoder_start=pad", "data.source=2024"])
    assert r.model.decoder_start == "pad" and r.data.source == "2024"
    with pytest.raises(UserError, match=r"decoder_start: expected one of 'bos', 'pad', got '1'"):
        recipe_lib.load("t5_ascii_cpu", ["model.decoder_start=1"])
