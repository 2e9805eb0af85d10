"""Run folders <-> GGUF (llama.cpp, Ollama), with ggml-org's `gguf` package.

Export: architecture "llama", the hyperparameters llama.cpp needs (context length = the model's max_seq_len),
tensors token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down}, output_norm, output (left out when tied: llama.cpp then reuses token_embd), and the sentencepiece
vocabulary as tokenizer.ggml.model "llama" (tokens, scores, token types, BOS/EOS/UNK ids), plus the chat template
of an SFT run. Matrices are f32, f16, bf16 or q8_0 (gguf's own quantizer; a matrix whose rows are not a multiple
of 32 falls back to f16); norms stay f32, as llama.cpp's converter keeps 1-D tensors.

RoPE: llama.cpp's llama architecture rotates pairs of consecutive values (LLAMA_ROPE_TYPE_NORM), the layout
toolkit.models.llama (llama2.c, Meta) uses, so wq and wk go in unpermuted. llama.cpp's convert_hf_to_gguf.py
permutes HF's rotate-half q/k back to this layout (reshape(n_head, 2, d/2, ...).swapaxes(1, 2)); the
numpy forward in tests/test_export_gguf.py checks it.

Import reads any llama GGUF with those tensor types (dequantized to fp32). An lmkit export also carries its
sentencepiece model and recipe under lmkit.* keys, so it comes back exactly; a foreign GGUF gets a tokenizer
built from its tokens and scores (run.c's encoder, kind "llama2c").
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

from toolkit.errors import UserError

ARCH = "llama"
DTYPES = ("f32", "f16", "bf16", "q8_0")
SP_KEY = "lmkit.tokenizer.sentencepiece_model"  # base64 of tokenizer.model
RECIPE_KEY = "lmkit.recipe"  # the run's recipe as JSON
STEP_KEY = "lmkit.step"
LAYER_TENSORS = {  # toolkit.models.llama name within a layer -> gguf MODEL_TENSOR member
    "attention_norm": "ATTN_NORM",
    "attention.wq": "ATTN_Q",
    "attention.wk": "ATTN_K",
    "attention.wv": "ATTN_V",
    "attention.wo": "ATTN_OUT",
    "ffn_norm": "FFN_NORM",
    "feed_forward.w1": "FFN_GATE",
    "feed_forward.w2": "FFN_DOWN",
    "feed_forward.w3": "FFN_UP",
}
TOP_TENSORS = {"tok_embeddings": "TOKEN_EMBD", "norm": "OUTPUT_NORM", "output": "OUTPUT"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("the gguf package is missing; install it with: pip install gguf") from None
    return gguf


def gguf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight' (names from gguf's own table)."""
    gguf = _gguf()
    stem, _, suffix = name.rpartition(".")
    if stem in TOP_TENSORS:
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[TOP_TENSORS[stem]]]}.{suffix}"
    _, layer, rest = stem.split(".", 2)
    return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[LAYER_TENSORS[rest]]].format(bid=int(layer))}.{suffix}"


def lmkit_names(n_layers: int) -> dict[str, str]:
    """gguf tensor name -> toolkit.models.llama name, for every tensor a llama of n_layers can have."""
    names = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    names += [f"layers.{i}.{part}.weight" for i in range(n_layers) for part in LAYER_TENSORS]
    return {gguf_name(n): n for n in names}


# ---------------------------------------------------------------------------------------------------------
# export


def token_types(sp) -> list[int]:
    gguf = _gguf()
    T = gguf.TokenType
    out = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            out.append(T.UNKNOWN)
        elif sp.is_control(i):
            out.append(T.CONTROL)
        elif sp.is_byte(i):
            out.append(T.BYTE)
        elif sp.is_unused(i):
            out.append(T.UNUSED)
        else:
            out.append(T.NORMAL)
    return [int(t) for t in out]


def encode_tensor(array: np.ndarray, dtype: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor: 1-D tensors stay f32; q8_0 needs rows of 32."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        dtype = "f16"
    if dtype == "f16":
        return array.astype(np.float16), None
    qtype = Q.BF16 if dtype == "bf16" else Q.Q8_0
    return gguf.quants.quantize(array, qtype), qtype


def export_gguf(run_path: Path, out: Path, dtype: str = "f16", force: bool = False):
    """Write a llama-family run with a sentencepiece vocabulary as one .gguf file."""
    from toolkit.export.hf import Exported, chat_template_for, check_exportable
    from toolkit.fsio import atomic_write
    from toolkit.run import load_run, weights_dict

    gguf = _gguf()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)} for --format gguf")
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; give the file to write, e.g. -o {out / 'model.gguf'}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    run = load_run(run_path)
    check_exportable(run, "GGUF")
    tok, c = run.tokenizer, run.model.config
    if tok.kind != "sentencepiece":
        raise UserError(f"{run_path}: the gguf export needs a sentencepiece vocabulary (this run's tokenizer is "
                        f"{tok.kind!r}); llama.cpp's llama tokenizer could not reproduce it")
    template = chat_template_for(run.recipe.data.chat_template)
    warnings = []
    tensors = {}
    for name, t in weights_dict(run.model).items():
        if name == "output.weight" and c.tie_embeddings:
            continue
        data, raw = encode_tensor(t.float().numpy(), dtype)
        if dtype == "q8_0" and raw is None and t.ndim == 2:
            warnings.append(f"{name}: rows of {t.shape[-1]} are not a multiple of 32; written as f16")
        tensors[gguf_name(name)] = (data, raw)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[dtype]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_name(run.recipe.name)
        w.add_file_type(int(gguf.LlamaFileType[file_type]))
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.dim)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.ffn_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.kv_heads)
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_vocab_size(c.vocab_size)
        sp = tok.sp
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        w.add_token_scores([float(sp.get_score(i)) for i in range(sp.vocab_size())])
        w.add_token_types(token_types(sp))
        if tok.bos_id is not None:
            w.add_bos_token_id(tok.bos_id)
            w.add_add_bos_token(True)
        if tok.eos_id is not None:
            w.add_eos_token_id(tok.eos_id)
        w.add_add_eos_token(False)
        if sp.unk_id() >= 0:
            w.add_unk_token_id(sp.unk_id())
        if template:
            w.add_chat_template(template)
        w.add_string(SP_KEY, base64.b64encode(tok.model_proto).decode("ascii"))
        w.add_string(RECIPE_KEY, json.dumps(run.recipe.to_dict()))
        w.add_uint32(STEP_KEY, int(run.step))
        for name, (data, raw) in tensors.items():
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    return Exported(out, [out.name], warnings)


# ---------------------------------------------------------------------------------------------------------
# import


def open_reader(path: Path):
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on a foreign file
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None


def field(reader, key: str, default=None):
    f = reader.get_field(key)
    return default if f is None else f.contents()


def hyperparameters(reader, path: Path) -> dict:
    """The llama Config values (toolkit/models/llama.py) of a llama GGUF's keys."""
    arch = field(reader, "general.architecture")
    if arch != ARCH:
        raise UserError(f"{path}: architecture {arch!r}; only llama GGUFs import")

    def key(name: str, default=None):
        value = field(reader, f"{ARCH}.{name}", default)
        if value is None:
            raise UserError(f"{path}: missing {ARCH}.{name}")
        return value

    dim, heads = int(key("embedding_length")), int(key("attention.head_count"))
    rope_dims = int(key("rope.dimension_count", dim // heads))
    if rope_dims != dim // heads:
        raise UserError(f"{path}: RoPE over {rope_dims} of {dim // heads} head dimensions is not supported")
    scaling = field(reader, f"{ARCH}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UserError(f"{path}: RoPE scaling {scaling!r} is not supported (only plain RoPE)")
    def decimal(value) -> float:  # GGUF keeps these as float32: 1e-5 reads back as 1e-5, not 9.99999974e-06
        return float(str(np.float32(value)))

    return dict(dim=dim, n_layers=int(key("block_count")), n_heads=heads,
                n_kv_heads=int(key("attention.head_count_kv", heads)), hidden_dim=int(key("feed_forward_length")),
                norm_eps=decimal(key("attention.layer_norm_rms_epsilon")),
                rope_theta=decimal(key("rope.freq_base", 10000.0)), max_seq_len=int(key("context_length")),
                dropout=0.0)


def read_tensors(reader, n_layers: int, path: Path) -> dict[str, torch.Tensor]:
    """fp32 tensors by toolkit.models.llama name."""
    gguf = _gguf()
    names = lmkit_names(n_layers)
    out = {}
    for t in reader.tensors:
        if t.name not in names:
            if t.name.startswith("rope_freqs"):
                raise UserError(f"{path}: has {t.name} (scaled RoPE, llama 3.1 style); not supported")
            raise UserError(f"{path}: tensor {t.name} has no place in a llama model")
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{path}: {t.name} is {t.tensor_type.name}; lmkit reads f32, f16, bf16 and q8_0 "
                            f"(re-export or llama-quantize to one of those)") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[names[t.name]] = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))
    return out


def read_tokenizer(reader, path: Path):
    """The lmkit sentencepiece model when the file carries one, else run.c's encoder over its tokens/scores."""
    import tempfile

    from toolkit.tokenizers.llama2c import Llama2cTokenizer
    from toolkit.tokenizers.llama2c_bin import write_tokenizer_bin
    from toolkit.tokenizers.sentencepiece import SentencePieceTokenizer

    embedded = field(reader, SP_KEY)
    if embedded:
        return SentencePieceTokenizer(base64.b64decode(embedded))
    model = field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise UserError(f"{path}: tokenizer {model!r}; lmkit reads GGUFs with a sentencepiece (\"llama\") vocabulary")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    scores = field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id", 1), field(reader, "tokenizer.ggml.eos_token_id", 2)
    if (bos, eos) != (1, 2) or len(tokens) < 259:
        raise UserError(f"{path}: its vocabulary (BOS {bos}, EOS {eos}, {len(tokens)} tokens) is not in the llama2.c "
                        f"layout lmkit can rebuild without the sentencepiece model")
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "tokenizer.bin"
        write_tokenizer_bin(file, list(zip(tokens, scores)), bos, eos)
        return Llama2cTokenizer.from_file(file, len(tokens))


def open_gguf(path: Path, device="cpu"):
    """A llama GGUF as an lmkit model, tokenizer and recipe, in memory (what `lmkit chat model.gguf` uses)."""
    from toolkit import models
    from toolkit.export.hf import Opened, imported_recipe, load_checked

    path = Path(path)
    reader = open_reader(path)
    values = hyperparameters(reader, path)
    tensors = read_tensors(reader, values["n_layers"], path)
    if "tok_embeddings.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight")
    values["vocab_size"] = int(tensors["tok_embeddings.weight"].shape[0])
    values["tie_embeddings"] = "output.weight" not in tensors
    tok = read_tokenizer(reader, path)
    recipe = imported_recipe(field(reader, RECIPE_KEY), values, path, "GGUF", tok.kind, tok.vocab_size)
    model = models.build(recipe.model, values["vocab_size"], init=False)
    load_checked(model, tensors, values["tie_embeddings"], path, gguf_name, "its header")
    return Opened(model.to(device).eval(), tok, recipe, int(field(reader, STEP_KEY, 0) or 0))


def import_gguf(path: Path, out: Path, force: bool = False) -> Path:
    from toolkit.export.hf import write_imported_run

    opened = open_gguf(path)
    return write_imported_run(out, opened.model, opened.tokenizer, opened.recipe, opened.step,
                              {"imported_from": str(path), "format": "gguf"}, force)
