"""Run folders <-> llama2.c files, Hugging Face transformers folders (hf.py) and GGUF files (gguf.py).

`export_run(run, out)` writes out/model.bin (v0, v1 or v2), tokenizer.bin beside it (plus tokenizer.model
for a sentencepiece vocabulary, which `lmkit chat` prefers), and a sidecar `model.json` with what the
.bin cannot say: vocabulary size, tokenizer kind and fingerprint, the resolved recipe, the step.
`import_bin(model.bin, tokenizer.bin, out)` turns any of the three versions into a run folder.
`open_bin(model.bin, tokenizer.bin)` does the same in memory, for chat and eval.
`export_hf`/`import_hf`/`open_hf` and `export_gguf`/`import_gguf`/`open_gguf` do the same for the other two
formats (imported lazily: transformers and gguf load only when used); `export_any(run, out, fmt)` picks one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from toolkit.console import info
from toolkit.errors import UserError
from toolkit.export import llama2c
from toolkit.fsio import atomic_write_bytes, atomic_write_json

FORMATS = {"v0": 0, "v1": 1, "v2": 2}
SIDECAR_FORMAT = "lmkit-llama2c-sidecar/1"


def sidecar_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


# ---------------------------------------------------------------------------------------------------------
# tokenizer files beside a model.bin


def tokenizer_files(tok) -> dict[str, bytes]:
    """The llama2.c-side files for a tokenizer: tokenizer.bin, and tokenizer.model for sentencepiece."""
    if tok.kind == "sentencepiece":
        import tempfile

        from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.bin"
            write_tokenizer_bin(path, tok.pieces(), tok.bos_id, tok.eos_id)
            return {"tokenizer.bin": path.read_bytes(), "tokenizer.model": tok.model_proto}
    if tok.kind == "llama2c":
        return {"tokenizer.bin": tok.raw}
    return {}


def check_llama_layout(tok) -> str | None:
    """Why run.c could not use this vocabulary (None when it can): run.c encodes with unk 0, BOS 1, EOS 2 and
    byte pieces <0xXX> at byte + 3."""
    if tok.kind not in ("sentencepiece", "llama2c"):
        return f"a {tok.kind} tokenizer has no tokenizer.bin; run.c needs a sentencepiece vocabulary"
    if (tok.bos_id, tok.eos_id) != (1, 2):
        return f"BOS/EOS are {tok.bos_id}/{tok.eos_id}, run.c assumes 1/2"
    if tok.kind == "sentencepiece":
        sp = tok.sp
        if tok.vocab_size < 259 or any(sp.id_to_piece(b + 3) != f"<0x{b:02X}>" for b in range(256)):
            return "no byte-fallback pieces at ids 3..258 (run.c encodes unknown characters as byte + 3)"
    return None


def load_bin_tokenizer(path: Path, vocab_size: int):
    """The tokenizer for a llama2.c model: a sentencepiece tokenizer.model beside tokenizer.bin (same stem)
    when it matches the .bin, else one built from tokenizer.bin alone (run.c's encoder)."""
    from toolkit.tokenizers.llama2c import Llama2cTokenizer

    path = Path(path)
    tok = Llama2cTokenizer.from_file(path, vocab_size)
    sp_path = path.with_suffix(".model")
    if sp_path.is_file():
        from toolkit.tokenizers.sentencepiece import SentencePieceTokenizer

        try:
            sp = SentencePieceTokenizer(sp_path.read_bytes())
        except Exception:  # not a sentencepiece model: ignore it
            return tok
        if sp.vocab_size == vocab_size and tokenizer_files(sp)["tokenizer.bin"] == tok.raw:
            return sp
        info(f"{sp_path} does not match {path}; using {path.name} alone")
    return tok


def find_tokenizer(model_path: Path, given: Path | None) -> Path:
    """-z if given, else tokenizer.bin beside the model, else ./tokenizer.bin (run.c's default)."""
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"tokenizer file not found: {given}")
        return Path(given)
    side_file = (read_sidecar(model_path).get("tokenizer") or {}).get("file") or "tokenizer.bin"
    candidates = [Path(model_path).parent / side_file, Path("tokenizer.bin")]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"no tokenizer.bin beside {model_path}; give the model's tokenizer with -z tokenizer.bin")


def read_sidecar(model_path: Path) -> dict:
    path = sidecar_path(model_path)
    if not path.is_file():
        return {}
    try:
        side = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return side if isinstance(side, dict) and side.get("format") == SIDECAR_FORMAT else {}


# ---------------------------------------------------------------------------------------------------------
# export


@dataclass
class Exported:
    model: Path
    header: llama2c.Header
    files: list[Path]
    warnings: list[str]


def export_run(run_path: Path, out: Path, fmt: str = "v0", group_size: int = 0, force: bool = False) -> Exported:
    from toolkit.run import load_run

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of v0 (run.c), v1 (fp32), v2 (int8, runq.c), "
                        f"hf (transformers), gguf (llama.cpp, Ollama)")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the file to write, e.g. -o {out / 'model.bin'}")
    run = load_run(run_path)
    if run.recipe.model.family != "llama":
        raise UserError(f"{run_path}: only llama-family models export to llama2.c .bin "
                        f"(this run is {run.recipe.model.family!r})")
    side_path = sidecar_path(out)
    files = tokenizer_files(run.tokenizer)
    clashes = [p for p in (out, side_path) if p.exists()]
    clashes += [out.parent / n for n, data in files.items()
                if (out.parent / n).exists() and (out.parent / n).read_bytes() != data]
    if clashes and not force:
        raise UserError(f"{clashes[0]} already exists; pass --force to replace it")
    warnings = []
    reason = check_llama_layout(run.tokenizer)
    if reason:
        warnings.append(f"run.c cannot use this vocabulary: {reason}")
    c = run.model.config
    if c.norm_eps != 1e-5 or c.rope_theta != 10000.0:
        warnings.append(f"run.c hard-codes norm_eps 1e-5 and rope_theta 10000; this model has {c.norm_eps} "
                        f"and {c.rope_theta} (lmkit chat reads them from the sidecar)")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = llama2c.export_model(run.model, out, FORMATS[fmt], group_size)
    written = [out]
    for name, data in files.items():
        path = out.parent / name
        if not path.exists() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        written.append(path)
    side = {
        "format": SIDECAR_FORMAT,
        "model": out.name,
        "version": header.version,
        "group_size": header.group_size,
        "vocab_size": header.vocab_size,
        "tokenizer": {"kind": run.tokenizer.kind, "fingerprint": run.tokenizer.fingerprint,
                      "bos_id": run.tokenizer.bos_id, "eos_id": run.tokenizer.eos_id,
                      "file": "tokenizer.bin" if files else None},
        "step": run.step,
        "source": str(run.path),
        "recipe": run.recipe.to_dict(),
    }
    atomic_write_json(side_path, side)
    written.append(side_path)
    return Exported(out, header, written, warnings)


# ---------------------------------------------------------------------------------------------------------
# import


def _recipe_for(model_path: Path, header: llama2c.Header, tokenizer_folder: Path, kind: str):
    from toolkit import recipe as recipe_lib

    side = read_sidecar(model_path)
    raw = side.get("recipe") if isinstance(side.get("recipe"), dict) else None
    if raw is not None:
        try:
            recipe = recipe_lib.from_dict(raw, str(sidecar_path(model_path)))
        except UserError as e:
            info(f"ignoring the recipe in {sidecar_path(model_path)} ({e})")
            raw = None
    if raw is None:
        recipe = recipe_lib.from_dict({"name": f"imported_{Path(model_path).stem}",
                                       "description": f"imported from llama2.c {Path(model_path).name}",
                                       "model": {"family": "llama"}}, str(model_path))
    model = llama2c.model_config(header, recipe.model)
    tokenizer = replace(recipe.tokenizer, kind=kind, path=str(tokenizer_folder),
                        vocab_size=header.vocab_size)
    export = replace(recipe.export, format=f"v{header.version}", group_size=header.group_size)
    return recipe.replace(model=model, tokenizer=tokenizer, export=export)


@dataclass
class Opened:
    header: llama2c.Header
    model: object
    tokenizer: object
    recipe: object
    sidecar: dict


def open_bin(model_path: Path, tokenizer_path: Path | None = None, device="cpu") -> Opened:
    """A llama2.c model.bin with its tokenizer, in memory (what `lmkit chat model.bin` uses). device "numpy": the
    model is a llama_cpu.NumpyLlama, loaded without torch, when the .bin holds a standard llama (a .bin always
    does, unless its sidecar recipe has a switch run.c cannot run); else the torch Model on the CPU."""
    model_path = Path(model_path)
    header = llama2c.read_header(model_path)
    tok = load_bin_tokenizer(find_tokenizer(model_path, tokenizer_path), header.vocab_size)
    recipe = _recipe_for(model_path, header, Path("tokenizer"), tok.kind)
    model = None
    if device == "numpy":
        from toolkit import models

        device = "cpu"
        if models.has_numpy_model(recipe.model):
            model = models.numpy_model(recipe.model, llama2c.read_bin(model_path)[1])
    if model is None:
        header, model = llama2c.load_model(model_path, recipe.model, device)
    return Opened(header, model, tok, recipe, read_sidecar(model_path))


def import_bin(model_path: Path, tokenizer_path: Path | None, out: Path, force: bool = False) -> Path:
    """Write a run folder (model.safetensors, recipe.toml, tokenizer/, run.json) from a llama2.c model.bin."""
    from toolkit import recipe as recipe_lib
    from toolkit.run import RECIPE, RUN_INFO, TOKENIZER, WEIGHTS, save_weights, write_json

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
        if out.is_dir():
            for name in (WEIGHTS, RECIPE, RUN_INFO, TOKENIZER):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    opened = open_bin(model_path, tokenizer_path)
    out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_for(Path(model_path), opened.header, out / TOKENIZER, opened.tokenizer.kind)
    opened.tokenizer.save(out / TOKENIZER)
    save_weights(opened.model, out / WEIGHTS, step=int(opened.sidecar.get("step", 0) or 0))
    recipe_lib.save(recipe, out / RECIPE)
    write_json(out / RUN_INFO, {"imported_from": str(model_path), "llama2c_version": opened.header.version,
                                "group_size": opened.header.group_size, "tokenizer_kind": opened.tokenizer.kind})
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face and GGUF (the modules load transformers / gguf only when called)

HF_FORMATS = ("hf", "gguf")
DEFAULT_DTYPE = {"hf": "f32", "gguf": "f16"}


def export_hf(run_path: Path, out: Path, dtype: str = "f32", force: bool = False):
    from toolkit.export import hf

    return hf.export_hf(run_path, out, dtype, force)


def import_hf(folder: Path, out: Path, force: bool = False) -> Path:
    from toolkit.export import hf

    return hf.import_hf(folder, out, force)


def open_hf(folder: Path, device="cpu"):
    from toolkit.export import hf

    return hf.open_hf(folder, device)


def is_hf_folder(path: Path) -> bool:
    from toolkit.export import hf

    return hf.is_hf_folder(path)


def export_gguf(run_path: Path, out: Path, dtype: str = "f16", force: bool = False):
    from toolkit.export import gguf

    return gguf.export_gguf(run_path, out, dtype, force)


def import_gguf(path: Path, out: Path, force: bool = False) -> Path:
    from toolkit.export import gguf

    return gguf.import_gguf(path, out, force)


def open_gguf(path: Path, device="cpu"):
    from toolkit.export import gguf

    return gguf.open_gguf(path, device)


def import_any(source: Path, out: Path, tokenizer: Path | None = None, force: bool = False) -> Path:
    """A .gguf file, a transformers folder or a llama2.c .bin -> a run folder."""
    source = Path(source)
    if source.is_dir():
        if not is_hf_folder(source):
            raise UserError(f"{source} is not a run folder (needs model.safetensors and recipe.toml) nor a "
                            f"transformers folder (config.json with model.safetensors or its .index.json)")
        return import_hf(source, out, force)
    if source.suffix.lower() == ".gguf":
        return import_gguf(source, out, force)
    return import_bin(source, tokenizer, out, force)
