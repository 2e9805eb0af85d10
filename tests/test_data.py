import json

import pytest
from conftest import lmkit

from toolkit.data import iter_documents, read_manifest, write_corpus
from toolkit.data.conversations import markdown_to_conversations, read_conversations, write_conversations
from toolkit.data.sources import documents, strip_markdown
from toolkit.data.synthetic import stories
from toolkit.errors import UserError
from toolkit.recipe import DataConfig


def test_markdown_folder_recursive_sorted_readme_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# Two\n\nsecond file")
    (tmp_path / "a.txt").write_text("first file\n\nstill first file")
    (tmp_path / "README.md").write_text("skip me")
    (tmp_path / "notes.pdf").write_text("not text")
    docs = list(documents(DataConfig(source=str(tmp_path))))
    assert docs == ["first file\n\nstill first file", "# Two\n\nsecond file"]  # raw, one document per file
    docs = list(documents(DataConfig(source=str(tmp_path), skip_readme=False)))
    assert "skip me" in docs


def test_strip_markdown_removes_markup_keeps_prose():
    md = ("---\ntitle: x\n---\n# Title\n<!-- hidden -->\nSee [the docs](http://x.y/z) and ![img](a.png).\n\n"
          "```rust\nfn main() {}\n```\n{{#include file.rs}}\n[ref]: http://example.com\nEnd.")
    out = strip_markdown(md)
    assert out == "# Title\n\nSee the docs and img.\n\nEnd."


def test_txt_separator_auto_eot_and_blank_lines(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("one\n\nstill one<|endoftext|>two<|endoftext|>")
    assert list(documents(DataConfig(source=str(p)))) == ["one\n\nstill one", "two"]
    p.write_text("para one\nline\n\n\npara two\n")
    assert list(documents(DataConfig(source=str(p)))) == ["para one\nline", "para two"]
    assert list(documents(DataConfig(source=str(p), separator="none"))) == ["para one\nline\n\n\npara two"]


def test_jsonl_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"story": "a"}\n\n{"story": "b"}\n')
    assert list(documents(DataConfig(source=str(p), text_field="story"))) == ["a", "b"]
    with pytest.raises(UserError, match=r"d\.jsonl:1: no 'text' field"):
        list(documents(DataConfig(source=str(p))))


def test_max_rows_and_chars():
    docs = list(documents(DataConfig(source="synthetic", synthetic_stories=50, max_rows=5)))
    assert len(docs) == 5
    docs = list(documents(DataConfig(source="synthetic", synthetic_stories=50, max_chars=1000)))
    assert sum(map(len, docs)) == 1000


def test_missing_source_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="data source not found: .*nope"):
        list(documents(DataConfig(source=str(tmp_path / "nope"))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub.*use local files"):
        list(documents(DataConfig(source="hf:someone/not-cached-dataset")))


def test_synthetic_is_deterministic_structured_and_seedable():
    a, b = list(stories(200, seed=1)), list(stories(200, seed=1))
    assert a == b and list(stories(5, seed=2)) != a[:5]
    text = "\n".join(a)
    assert len(set(a)) == 200
    assert '"' in text and "said" in text  # dialogue
    for s in a:  # the hero's name recurs: characters persist through a story
        first_name = s.split("named ")[1].split(".")[0].split(" ")[0] if "named " in s else None
        if first_name:
            assert s.count(first_name) >= 2


def test_split_is_deterministic_and_never_empty(tmp_path):
    m = write_corpus(["only one long document " * 20], tmp_path / "one", 0.1, "t")
    assert m["documents"] == {"train": 1, "val": 1}
    joined = next(iter_documents(tmp_path / "one", "train")) + next(iter_documents(tmp_path / "one", "val"))
    assert joined == "only one long document " * 20
    m = write_corpus(["a", "b", "c"], tmp_path / "three", 0.1, "t")
    assert m["documents"] == {"train": 2, "val": 1}
    docs = [f"doc {i}" for i in range(100)]
    m = write_corpus(docs, tmp_path / "many", 0.1, "t")
    assert m["documents"] == {"train": 90, "val": 10}
    assert list(iter_documents(tmp_path / "many", "val")) == [f"doc {i}" for i in range(9, 100, 10)]
    m2 = write_corpus(docs, tmp_path / "again", 0.1, "t")
    assert m2["sha256"] == m["sha256"]
    # the same documents split otherwise are another corpus (cached shards are keyed by this hash)
    assert write_corpus(docs, tmp_path / "other_split", 0.2, "t")["sha256"] != m["sha256"]
    with pytest.raises(UserError, match="already holds a corpus"):
        write_corpus(docs, tmp_path / "many", 0.1, "t")
    with pytest.raises(UserError, match="gave no documents"):
        write_corpus([], tmp_path / "empty", 0.1, "t")


def test_cli_data_writes_corpus_and_manifest(capsys, tmp_path):
    code, _, err = lmkit(capsys, "data", "synthetic", "-o", str(tmp_path / "c"), "--stories", "30")
    assert code == 0, err
    m = read_manifest(tmp_path / "c")
    assert m["documents"]["train"] + m["documents"]["val"] == 30 and m["source"] == "synthetic"
    lines = (tmp_path / "c" / "train.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["text"].strip()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = lmkit(capsys, "data", str(empty), "-o", str(tmp_path / "d"))
    assert code == 1 and "no .md, .txt or .jsonl files" in err and "Traceback" not in err


def test_conversations_from_markdown_both_line_formats(capsys, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ch1.md").write_text("# Ownership\n\n" + "Ownership is a set of rules that govern memory. " * 3 +
                                 "\n\n```rust\nlet s = String::new();\n```\n\n# Borrowing\n\n" +
                                 "References let you use a value without taking ownership of it at all. " * 2)
    convs = list(markdown_to_conversations(docs))
    assert len(convs) == 2
    assert convs[0][0]["role"] == "user" and "ownership" in convs[0][0]["content"].lower()
    assert convs[0][1]["content"].startswith("Ownership is a set of rules")
    out_a, out_m = tmp_path / "a.jsonl", tmp_path / "m.jsonl"
    assert lmkit(capsys, "data", "conversations", str(docs), "-o", str(out_a))[0] == 0
    assert lmkit(capsys, "data", "conversations", str(docs), "-o", str(out_m), "--format", "messages")[0] == 0
    assert json.loads(out_a.read_text().splitlines()[0])[0]["role"] == "user"
    assert "messages" in json.loads(out_m.read_text().splitlines()[0])
    assert list(read_conversations(out_a)) == list(read_conversations(out_m)) == convs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "robot", "content": "x"}]\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: each message needs a role"):
        list(read_conversations(bad))
    with pytest.raises(UserError, match="already exists"):
        write_conversations(convs, out_a)
