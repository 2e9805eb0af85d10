"""Run folders <-> Hugging Face transformers folders (LlamaForCausalLM; plain gpt2 runs as GPT2LMHeadModel, in
the GPT-2 section at the end).

Export writes config.json and generation_config.json (transformers' own classes write them), model.safetensors
with HF names, the tokenizer (tokenizer.model, tokenizer.json, tokenizer_config.json with the chat template of an
SFT run, special_tokens_map.json) and a README.md model card. The lmkit recipe rides along in the safetensors
metadata, so an import of an lmkit export gives back the same recipe.

RoPE: toolkit.models.llama rotates interleaved pairs (x[2i], x[2i+1]) of each head, as llama2.c and Meta's
checkpoints; HF's Llama rotates halves (x[i], x[i + d/2]). The rows of wq and wk (with n_kv_heads) are permuted
on the way out and back on the way in; nothing else changes, so a round trip is bitwise.

The tokenizer.json is built with the `tokenizers` library from the sentencepiece vocabulary and merges
(transformers' generate_merges) and reproduces sentencepiece's normalization: the dummy-prefix "▁" per text
segment and, when the model removes extra whitespace (lmkit's vocabularies do), stripped and collapsed spaces.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from toolkit.console import info
from toolkit.errors import UserError

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
RECIPE_KEY = "lmkit_recipe"

# llama2.c / toolkit.models.llama names -> transformers' LlamaForCausalLM names ("{i}" = the layer)
LAYER_NAMES = {
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
FAMILIES_WITHOUT_CLASS = {
    "attractor": "BoggersTheLLM's attractor dynamics",
    "pgpt": "PGPT-Lformer's attention-II",
    "t5": "the PGPT-Lformer span denoiser",
}


# ---------------------------------------------------------------------------------------------------------
# names and the RoPE permutation


def to_hf_name(name: str, top: dict, layer: dict, hf_layers: str) -> str:
    """An lmkit tensor name -> transformers': `top` maps whole stems, `layer` the part after the layer index,
    `hf_layers` is transformers' prefix of the layer list ('model.layers', 'transformer.h')."""
    stem, _, suffix = name.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{suffix}"
    _, index, rest = stem.split(".", 2)
    return f"{hf_layers}.{index}.{layer[rest]}.{suffix}"


def from_hf_name(name: str, top: dict, layer: dict, hf_layers: str, our_layers: str) -> str | None:
    """The inverse of to_hf_name; None for a tensor lmkit's model has no place for."""
    stem, _, suffix = name.rpartition(".")
    for ours, theirs in top.items():
        if stem == theirs:
            return f"{ours}.{suffix}"
    head, _, rest = stem.partition(hf_layers + ".")
    index, _, part = rest.partition(".")
    if not head and index.isdigit():
        for ours, theirs in layer.items():
            if part == theirs:
                return f"{our_layers}.{index}.{ours}.{suffix}"
    return None


def hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    return to_hf_name(name, TOP_NAMES, LAYER_NAMES, "model.layers")


def lmkit_name(name: str) -> str | None:
    """The inverse of hf_name; None for a tensor lmkit's llama has no place for."""
    return from_hf_name(name, TOP_NAMES, LAYER_NAMES, "model.layers", "layers")


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection, per head, from pairs (2i, 2i+1) to halves (i, i + d/2): HF's layout."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_tensors(state: dict[str, torch.Tensor], config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """lmkit llama weights (a tied output is left out) -> HF names, q/k permuted, in `dtype`."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            t = interleaved_to_halves(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = interleaved_to_halves(t, config.kv_heads)
        out[hf_name(name)] = t.detach().to("cpu", dtype).contiguous()
    return out


def from_hf_tensors(tensors: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """HF llama weights -> lmkit names, q/k back to interleaved pairs, fp32."""
    out, unknown = {}, []
    for name, t in tensors.items():
        ours = lmkit_name(name)
        if ours is None:
            if not name.endswith("rotary_emb.inv_freq"):
                unknown.append(name)
            continue
        t = t.to(torch.float32)
        if ours.endswith("attention.wq.weight"):
            t = halves_to_interleaved(t, n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = halves_to_interleaved(t, n_kv_heads)
        out[ours] = t.contiguous()
    if unknown:
        raise UserError(f"tensor {unknown[0]} has no place in a llama model ({len(unknown)} such tensors); "
                        f"only plain LlamaForCausalLM weights import")
    return out


# ---------------------------------------------------------------------------------------------------------
# the tokenizer


def sentencepiece_options(sp) -> tuple[bool, bool]:
    """(add_dummy_prefix, remove_extra_whitespaces) of a sentencepiece model, read from how it encodes."""
    add_prefix = sp.encode_as_pieces("a")[0].startswith("▁")
    remove_spaces = sp.encode(" a  a ") == sp.encode("a a")
    return add_prefix, remove_spaces


def hf_tokenizer(tok, max_len: int, chat_template: str | None = None):
    """A transformers fast tokenizer equal to the sentencepiece tokenizer `tok` (ids in, ids out)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    add_prefix, remove_spaces = sentencepiece_options(sp)
    unk = sp.id_to_piece(sp.unk_id())
    model = BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = Tokenizer(model)
    steps = []
    if remove_spaces:
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if add_prefix:
        steps.append(normalizers.Prepend("▁"))  # per text segment, as sentencepiece per encode call
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    decoding = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        decoding.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decoding)
    special = {"unk_token": unk}
    if tok.bos_id is not None:
        bos = sp.id_to_piece(tok.bos_id)
        special["bos_token"] = bos
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, tok.bos_id)])
    if tok.eos_id is not None:
        special["eos_token"] = sp.id_to_piece(tok.eos_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_len, clean_up_tokenization_spaces=False,
                                   **special)
    if chat_template:
        fast.chat_template = chat_template
    return fast, special


def write_tokenizer(tok, folder: Path, max_len: int, chat_template: str | None) -> list[str]:
    """tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json; the names written."""
    if tok.kind != "sentencepiece":
        raise UserError(f"the hf export needs a sentencepiece vocabulary (this run's tokenizer is {tok.kind!r})")
    fast, special = hf_tokenizer(tok, max_len, chat_template)
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=tok.bos_id is not None, add_eos_token=False,
               legacy=False)
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_temp")))


# ---------------------------------------------------------------------------------------------------------
# chat templates (Jinja) that render what toolkit.data.chat_template encodes


_SPLIT_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
)

LLAMA2 = _SPLIT_SYSTEM + (
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('user and assistant turns must alternate, after an optional system message') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' }}"
    "{%- if loop.first and system %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif -%}"
    "{{ m['content'] | trim + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + m['content'] | trim + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

QA = _SPLIT_SYSTEM + (
    "{{ bos_token }}"
    "{%- if system %}{{ system }}{% if turns %}{{ '\\n' }}{% endif %}{% endif -%}"
    "{%- for m in turns -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{{ ('Q: ' if m['role'] == 'user' else 'A: ') + m['content'] | trim }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\nA:' }}{% else %}{{ eos_token }}{% endif -%}"
)

CHAT_TEMPLATES = {"llama2": LLAMA2, "qa": QA}


def chat_template_for(name: str) -> str | None:
    """The Jinja template for a recipe's data.chat_template ("" = a base model: none)."""
    if not name:
        return None
    if name not in CHAT_TEMPLATES:
        raise UserError(f"chat template {name!r} has no Jinja version (known: {', '.join(CHAT_TEMPLATES)})")
    return CHAT_TEMPLATES[name]


# ---------------------------------------------------------------------------------------------------------
# export


@dataclass
class Exported:
    path: Path
    files: list[str]
    warnings: list[str]


def check_exportable(run, target: str) -> None:
    family = run.recipe.model.family
    if family == "llama":
        blockers = run.recipe.model.runtime_blockers()
        if blockers:
            raise UserError(f"{run.path}: {target} cannot run this llama's {', '.join(blockers)}; only a model trained "
                            f"without them exports")
        return
    if family in FAMILIES_WITHOUT_CLASS:
        raise UserError(f"{run.path}: the {family} family ({FAMILIES_WITHOUT_CLASS[family]}) has no {target} "
                        f"model class; only llama-family runs export to {target}")
    if family == "gpt2" and getattr(run.recipe.model, "resonance", False):
        raise UserError(f"{run.path}: a Resonance gpt2 (phases and attention bias) has no {target} model class; "
                        f"only llama-family runs export to {target}")
    raise UserError(f"{run.path}: only llama-family runs export to {target} (this run is {family!r})")


def hf_config(config, tok, dtype: str):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim, hidden_act="silu", max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=None, attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )
    return cfg


def write_config(config, tok, dtype: str, folder: Path) -> None:
    """config.json as transformers writes it, with the weights' dtype under both names: `dtype` (transformers 5)
    and `torch_dtype` (older readers)."""
    hf_config(config, tok, dtype).save_pretrained(str(folder))
    path = folder / CONFIG
    cfg = json.loads(path.read_text())
    cfg["dtype"] = cfg["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_hf(run_path: Path, out: Path, dtype: str = "f32", force: bool = False) -> Exported:
    """Write a llama-family run as a transformers folder (see the module docstring); a gpt2 run: export_gpt2."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from toolkit.fsio import build_atomically
    from toolkit.run import load_run, weights_dict

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)} for --format hf")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    run = load_run(run_path)
    if run.recipe.model.family == "gpt2":
        return export_gpt2(run, out, dtype)
    check_exportable(run, "transformers")
    c = run.model.config
    template = chat_template_for(run.recipe.data.chat_template)
    warnings = []
    if run.tokenizer.kind != "sentencepiece":
        raise UserError(f"{run_path}: the hf export needs a sentencepiece vocabulary (this run's tokenizer is "
                        f"{run.tokenizer.kind!r}); AutoTokenizer could not reproduce it")

    def build(tmp: Path) -> list[str]:
        tensors = to_hf_tensors(weights_dict(run.model), c, DTYPES[dtype])
        meta = {"format": "pt", RECIPE_KEY: json.dumps(run.recipe.to_dict()), "lmkit_step": str(run.step)}
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        write_config(c, run.tokenizer, dtype, tmp)
        GenerationConfig(bos_token_id=run.tokenizer.bos_id, eos_token_id=run.tokenizer.eos_id,
                         max_length=c.max_seq_len).save_pretrained(str(tmp))
        write_tokenizer(run.tokenizer, tmp, c.max_seq_len, template)
        (tmp / "README.md").write_text(model_card(run, "transformers", dtype))
        return sorted(p.name for p in tmp.iterdir())

    files = build_atomically(out, build)
    return Exported(out, files, warnings)


# ---------------------------------------------------------------------------------------------------------
# the model card


def last_eval(run_path: Path) -> dict:
    """The last metrics.jsonl record with a val_loss ({} when there is none)."""
    path = Path(run_path) / "metrics.jsonl"
    found = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("val_loss") is not None:
                found = record
    return found


def model_card(run, target: str, dtype: str, architecture: str | None = None, tokenizer: str | None = None,
               tag: str = "llama") -> str:
    """The README.md of an export; `architecture`, `tokenizer` and `tag` default to a llama run's."""
    r, c, tok = run.recipe, run.model.config, run.tokenizer
    ev = last_eval(run.path)
    data = run.info.get("data", {}) if isinstance(run.info.get("data"), dict) else {}
    t = r.train
    rows = [
        ("parameters", f"{run.model.num_params():,}"),
        ("architecture", architecture or (
            f"llama: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads ({c.kv_heads} KV heads), "
            f"FFN {c.ffn_dim}, context {c.max_seq_len}, RoPE theta {c.rope_theta:g}, RMSNorm eps "
            f"{c.norm_eps:g}, {'tied' if c.tie_embeddings else 'separate'} embeddings")),
        ("tokenizer", tokenizer or f"sentencepiece BPE, {tok.vocab_size} tokens (BOS {tok.bos_id}, EOS {tok.eos_id})"),
        ("data", f"{r.data.source}" + (f", {data['train_tokens']:,} train / {data.get('val_tokens', 0):,} val tokens"
                                       if data.get("train_tokens") else "")),
        ("chat template", r.data.chat_template or "none (a base model: it continues text)"),
        ("training", f"{run.step} steps of batch {t.batch_size} x {t.grad_accum} accumulation x "
                     f"{run.info.get('seq_len', c.max_seq_len)} "
                     f"tokens, {t.optimizer} lr {t.lr:g} ({t.schedule}, warmup {t.warmup_iters}), weight decay "
                     f"{t.weight_decay:g}, dtype {run.info.get('dtype', t.dtype)}"),
    ]
    if ev:
        bpb = f", {ev['val_bpb']:.4f} bits per byte" if ev.get("val_bpb") else ""
        rows.append(("validation", f"loss {ev['val_loss']:.4f} (perplexity {ev.get('val_ppl') or 0:.2f}{bpb}) at "
                                   f"step {ev.get('step')}"))
    rows.append(("weights", f"{dtype}, exported from `{run.path}` by lmkit"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    use = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
           "tok = AutoTokenizer.from_pretrained(\"PATH\")\nmodel = AutoModelForCausalLM.from_pretrained(\"PATH\")\n"
           "ids = tok(\"Once upon a time\", return_tensors=\"pt\").input_ids\n"
           "print(tok.decode(model.generate(ids, max_new_tokens=64, do_sample=False)[0]))\n```\n")
    if r.data.chat_template:
        use += ("\nChat: `tok.apply_chat_template([{\"role\": \"user\", \"content\": \"...\"}], "
                "add_generation_prompt=True, return_tensors=\"pt\")` renders the template it was fine-tuned with.\n")
    recipe_toml = (Path(run.path) / "recipe.toml").read_text() if (Path(run.path) / "recipe.toml").is_file() else ""
    return (f"---\nlibrary_name: {target}\npipeline_tag: text-generation\ntags:\n- lmkit\n- {tag}\n---\n\n"
            f"# {r.name}\n\n{r.description or 'A small language model trained with lmkit.'}\n\n"
            f"| | |\n|---|---|\n{table}\n\n## Use\n\n{use}\n"
            f"## How it was trained\n\nWith `lmkit train` from this recipe (also in the weights' metadata):\n\n"
            f"```toml\n{recipe_toml.strip()}\n```\n")


# ---------------------------------------------------------------------------------------------------------
# run folders from imported models (transformers folders here, GGUF files in gguf.py)


def merged_llama_config(values: dict, base, tok_vocab: int):
    """A toolkit.models.llama Config from `values` (what the file says); `base` (an embedded recipe's model
    config, or None) keeps its own way of saying the same thing (hidden_dim 0, n_kv_heads 0, vocab_size 0)."""
    from toolkit.models.llama import Config

    if base is None or getattr(base, "family", None) != "llama":
        return Config(**values)
    values = dict(values)
    if base.ffn_dim == values.get("hidden_dim"):
        del values["hidden_dim"]
    if base.kv_heads == values.get("n_kv_heads"):
        del values["n_kv_heads"]
    if base.vocab_size == 0 and values.get("vocab_size") == tok_vocab:
        del values["vocab_size"]
    for key in ("dropout", "attention_dropout"):
        values.pop(key, None)
    return replace(base, **values)


def embedded_recipe(embedded: str | None, source: Path, family: str, origin: str):
    """The lmkit recipe an export embedded (JSON) if it parses and is of `family`, else a plain `family` recipe
    named after the file (`origin` says where it came from)."""
    from toolkit import recipe as recipe_lib

    if embedded:
        try:
            recipe = recipe_lib.from_dict(json.loads(embedded), f"{source} (embedded lmkit recipe)")
            if recipe.model.family == family:
                return recipe
        except (UserError, json.JSONDecodeError, TypeError, AttributeError) as e:
            info(f"ignoring the lmkit recipe in {source} ({e})")
    return recipe_lib.from_dict({"name": f"imported_{source.stem}", "description": f"imported from {origin}",
                                 "model": {"family": family}}, str(source))


def imported_recipe(embedded: str | None, values: dict, source: Path, fmt: str, tokenizer_kind: str = "sentencepiece",
                    tok_vocab: int = 0):
    """The recipe of an imported model: the one an lmkit export embedded (JSON), with the model's shape from the
    file; for a foreign file, a plain llama recipe."""
    source = Path(source)
    recipe = embedded_recipe(embedded, source, "llama", f"{fmt} {source.name}")
    try:
        model = merged_llama_config(values, recipe.model, tok_vocab or values.get("vocab_size", 0))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: its hyperparameters do not make a llama model ({e})") from None
    tokenizer = replace(recipe.tokenizer, kind=tokenizer_kind, path="tokenizer", vocab_size=tok_vocab or model.vocab_size)
    return recipe.replace(model=model, tokenizer=tokenizer)


def write_imported_run(out: Path, model, tokenizer, recipe, step: int, run_info: dict, force: bool = False) -> Path:
    """A run folder (model.safetensors, recipe.toml, tokenizer/, run.json), written whole or not at all."""
    from toolkit import recipe as recipe_lib
    from toolkit.fsio import build_atomically
    from toolkit.run import RECIPE, RUN_INFO, TOKENIZER, WEIGHTS, save_weights, write_json

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            out.unlink()
    final = recipe.replace(tokenizer=replace(recipe.tokenizer, path=str(out / TOKENIZER)))

    def build(tmp: Path) -> None:
        tokenizer.save(tmp / TOKENIZER)
        save_weights(model, tmp / WEIGHTS, step=step)
        recipe_lib.save(final, tmp / RECIPE)
        write_json(tmp / RUN_INFO, run_info)

    build_atomically(out, build)
    return out


# ---------------------------------------------------------------------------------------------------------
# import


def is_hf_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and ((path / WEIGHTS).is_file() or (path / INDEX).is_file())


def read_hf_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of model.safetensors or of the shards model.safetensors.index.json names, and the first
    file's metadata."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        try:
            index = json.loads((folder / INDEX).read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{folder / INDEX}: not a safetensors index (needs a weight_map)") from None
    tensors, meta = {}, {}
    for path in files:
        if not path.is_file():
            raise UserError(f"{path}: missing (named by {INDEX})")
        try:
            with safe_open(str(path), "pt") as f:
                meta = meta or (f.metadata() or {})
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except SafetensorError as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


def llama_values(cfg: dict, where: Path) -> dict:
    """The llama Config values (toolkit/models/llama.py) of a transformers config.json (refusing what lmkit cannot run)."""
    if cfg.get("model_type") != "llama":
        raise UserError(f"{where}: model_type {cfg.get('model_type')!r}; only llama folders import")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{where}: attention or MLP biases; lmkit's llama has none")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {cfg['hidden_act']!r}; lmkit's llama uses silu")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported (only plain RoPE)")
    dim, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if cfg.get("head_dim") not in (None, dim // heads):
        raise UserError(f"{where}: head_dim {cfg['head_dim']} is not hidden_size / num_attention_heads; lmkit's "
                        f"llama needs that")
    return dict(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab_size=int(cfg["vocab_size"]),
                hidden_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), dropout=0.0)


def read_hf_tokenizer(folder: Path):
    from toolkit.tokenizers.sentencepiece import SentencePieceTokenizer

    path = Path(folder) / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"{folder}: no tokenizer.model; lmkit imports HF llama folders with their sentencepiece "
                        f"tokenizer.model (a tokenizer.json alone is not supported)")
    try:
        return SentencePieceTokenizer(path.read_bytes())
    except Exception:
        raise UserError(f"{path}: not a sentencepiece model") from None


@dataclass
class Opened:
    model: object
    tokenizer: object
    recipe: object
    step: int


def load_checked(model, state: dict, tied: bool, where: Path, name_of, header: str) -> None:
    """Load imported tensors (lmkit names) into `model`, refusing a missing tensor or a wrong shape in one line that
    names the tensor as the file calls it (`name_of`)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (k == "output.weight" and tied)]
    if missing:
        raise UserError(f"{where}: no tensor for {name_of(missing[0])} ({len(missing)} missing)")
    for k, t in state.items():
        if expected[k].shape != t.shape:
            raise UserError(f"{where}: {name_of(k)} has shape {tuple(t.shape)}, {header} needs "
                            f"{tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)


def open_hf(folder: Path, device="cpu") -> Opened:
    """A transformers llama folder as an lmkit model, tokenizer and recipe, in memory."""
    from toolkit import models

    folder = Path(folder)
    if not is_hf_folder(folder):
        raise UserError(f"{folder} is not a transformers folder (needs {CONFIG} and {WEIGHTS} or {INDEX})")
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{folder / CONFIG}: not JSON") from None
    if isinstance(cfg, dict) and cfg.get("model_type") == "gpt2":
        return open_gpt2(folder, cfg, device)
    try:
        values = llama_values(cfg, folder / CONFIG)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder / CONFIG}: missing or bad {e}") from None
    tok = read_hf_tokenizer(folder)
    tensors, meta = read_hf_tensors(folder)
    recipe = imported_recipe(meta.get(RECIPE_KEY), values, folder, "transformers", tok.kind, tok.vocab_size)
    state = from_hf_tensors(tensors, values["n_heads"], values["n_kv_heads"])
    model = models.build(recipe.model, values["vocab_size"], init=False)
    load_checked(model, state, values["tie_embeddings"], folder, hf_name, "config.json")
    return Opened(model.to(device).eval(), tok, recipe, int(meta.get("lmkit_step", 0) or 0))


def import_hf(folder: Path, out: Path, force: bool = False) -> Path:
    opened = open_hf(folder)
    return write_imported_run(out, opened.model, opened.tokenizer, opened.recipe, opened.step,
                              {"imported_from": str(folder), "format": "transformers"}, force)



# ---------------------------------------------------------------------------------------------------------
# GPT-2 (toolkit.models.gpt2 without Resonance) <-> GPT2LMHeadModel
#
# The computation is HF GPT-2's: pre-LN blocks with LayerNorm (eps = norm_eps), learned absolute positions from
# 0, scores scaled by 1/sqrt(head_dim), exact (erf) GELU — transformers' "gelu", not GPT-2's tanh "gelu_new" —,
# MLP with biases, tied head. lmkit's attention has no biases: c_attn and c_proj get zero biases (adding 0 is
# exact) and an import refuses non-zero ones. HF's Conv1D stores weights as (in, out): every matrix is transposed.
# qkv's rows are [q; k; v], heads contiguous in each, which is how HF splits c_attn's output.

GPT2_ACTIVATION = "gelu"  # F.gelu with approximate="none"
GPT2_LAYER = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
              "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
GPT2_TOP = {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "ln_f": "transformer.ln_f",
            "lm_head": "lm_head"}
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
GPT2_ZERO_BIAS = ("attn.c_attn", "attn.c_proj")  # biases HF has and lmkit's gpt2 does not
EOT = "<|endoftext|>"


def gpt2_hf_name(name: str) -> str:
    """'blocks.3.attn.qkv.weight' -> 'transformer.h.3.attn.c_attn.weight'."""
    return to_hf_name(name, GPT2_TOP, GPT2_LAYER, "transformer.h")


def gpt2_lmkit_name(name: str) -> str | None:
    """The inverse of gpt2_hf_name (also for the legacy names without 'transformer.'); None for no place."""
    if not name.startswith(("transformer.", "lm_head")):
        name = "transformer." + name
    return from_hf_name(name, GPT2_TOP, GPT2_LAYER, "transformer.h", "blocks")


def gpt2_to_hf_tensors(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """lmkit gpt2 weights (the tied head left out) -> GPT2LMHeadModel names, Conv1D matrices transposed, the
    attention's zero biases added, in `dtype`."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            continue
        theirs = gpt2_hf_name(name)
        stem = theirs.rpartition(".")[0]
        if theirs.endswith(".weight") and stem.endswith(GPT2_CONV1D):
            t = t.t()
            if stem.endswith(GPT2_ZERO_BIAS):
                out[f"{stem}.bias"] = torch.zeros(t.shape[1], dtype=dtype)
        out[theirs] = t.detach().to("cpu", dtype).contiguous()
    return out


def gpt2_from_hf_tensors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights -> lmkit gpt2 names, fp32; refuses non-zero attention biases and untied heads."""
    out, unknown = {}, []
    for name, t in tensors.items():
        stem, _, suffix = name.rpartition(".")
        if stem.endswith(GPT2_ZERO_BIAS) and suffix == "bias":
            if t.count_nonzero():
                raise UserError(f"{where}: {name} is not zero; lmkit's gpt2 attention has no biases")
            continue
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old transformers' causal-mask buffers
            continue
        ours = gpt2_lmkit_name(name)
        if ours is None:
            unknown.append(name)
            continue
        t = t.to(torch.float32)
        if suffix == "weight" and stem.endswith(GPT2_CONV1D):
            t = t.t()
        out[ours] = t.contiguous()
    if unknown:
        raise UserError(f"{where}: tensor {unknown[0]} has no place in a gpt2 model ({len(unknown)} such tensors); "
                        f"only plain GPT2LMHeadModel weights import")
    head, emb = out.pop("lm_head.weight", None), out.get("tok_emb.weight")
    if head is not None and emb is not None and not torch.equal(head, emb):
        raise UserError(f"{where}: lm_head.weight differs from transformer.wte.weight; lmkit's gpt2 ties them")
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (openai/gpt-2 encoder.py), the alphabet of vocab.json."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level BPE from tiktoken's ranks, in rank order: each multi-byte token is what BPE
    with the lower ranks makes of its bytes, which ends in exactly two parts (for gpt2 this gives GPT-2's own
    vocab.bpe)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"tiktoken token {token!r} is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


_GPT2_FILES: dict = {}


def gpt2_vocab_and_merges(enc) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's and merges.txt's contents for a tiktoken byte-level encoding (cached per encoding)."""
    if enc.name not in _GPT2_FILES:
        b2u = bytes_to_unicode()

        def u(b: bytes) -> str:
            return "".join(b2u[x] for x in b)

        vocab = {u(k): v for k, v in enc._mergeable_ranks.items()}
        vocab.update(enc._special_tokens)
        _GPT2_FILES[enc.name] = vocab, [(u(a), u(b)) for a, b in bpe_merges(enc._mergeable_ranks)]
    return _GPT2_FILES[enc.name]


def check_gpt2_tokenizer(tok, where) -> None:
    if tok.kind == "sentencepiece":
        return
    if tok.kind != "tiktoken" or tok.encoding != "gpt2":
        name = f"tiktoken {tok.encoding}" if tok.kind == "tiktoken" else tok.kind
        raise UserError(f"{where}: the run's {name} tokenizer has no HF equivalent (the hf export of a gpt2 run "
                        f"writes tiktoken gpt2 without a vocab cap, or a sentencepiece vocabulary)")
    if tok.vocab_cap:
        raise UserError(f"{where}: the run's tiktoken gpt2 vocabulary is folded to {tok.vocab_cap} ids (vocab_cap); "
                        f"the tokenizer has no HF equivalent")


def gpt2_hf_tokenizer(tok, max_len: int, chat_template: str | None = None):
    """A transformers fast tokenizer equal to tiktoken gpt2 (`tok`), adding <|endoftext|> in front as lmkit's
    prompts do (GPT-2 runs train on documents that each start with it)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab, merges = gpt2_vocab_and_merges(tok.enc)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split pattern
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                      special_tokens=[(EOT, tok.bos_id)])])
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_len,
                                   clean_up_tokenization_spaces=False, **special)
    if chat_template:
        fast.chat_template = chat_template
    return fast, special, vocab, merges


def write_gpt2_tokenizer(tok, folder: Path, max_len: int, chat_template: str | None) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, and GPT-2's vocab.json and merges.txt."""
    fast, special, vocab, merges = gpt2_hf_tokenizer(tok, max_len, chat_template)
    fast.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
               add_prefix_space=False)
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def check_gpt2_exportable(run) -> None:
    c = run.model.config
    if c.uses_phases or c.uses_bias:
        raise UserError(f"{run.path}: a Resonance gpt2 (phases and attention bias) has no transformers model "
                        f"class; only llama-family and plain gpt2 runs export to transformers")


def gpt2_config(c, tok, vocab_size: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_positions=c.max_seq_len, n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.ffn_dim, activation_function=GPT2_ACTIVATION, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
        attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=None, architectures=["GPT2LMHeadModel"],
    )


def export_gpt2(run, out: Path, dtype: str) -> Exported:
    """A gpt2-family run (no Resonance phases or bias) as a GPT2LMHeadModel folder (see the section comment)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from toolkit.fsio import build_atomically
    from toolkit.run import weights_dict

    check_gpt2_exportable(run)
    check_gpt2_tokenizer(run.tokenizer, run.path)
    c, tok = run.model.config, run.tokenizer
    template = chat_template_for(run.recipe.data.chat_template)
    vocab_size = run.model.tok_emb.weight.shape[0]

    def build(tmp: Path) -> list[str]:
        tensors = gpt2_to_hf_tensors(weights_dict(run.model), DTYPES[dtype])
        meta = {"format": "pt", RECIPE_KEY: json.dumps(run.recipe.to_dict()), "lmkit_step": str(run.step)}
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        gpt2_config(c, tok, vocab_size).save_pretrained(str(tmp))
        path = tmp / CONFIG
        cfg = json.loads(path.read_text())
        cfg["n_ctx"] = c.max_seq_len  # what older readers call n_positions
        cfg["dtype"] = cfg["torch_dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         max_length=c.max_seq_len).save_pretrained(str(tmp))
        if tok.kind == "sentencepiece":
            write_tokenizer(tok, tmp, c.max_seq_len, template)
            tok_row = f"sentencepiece BPE, {tok.vocab_size} tokens (BOS {tok.bos_id}, EOS {tok.eos_id})"
        else:
            write_gpt2_tokenizer(tok, tmp, c.max_seq_len, template)
            tok_row = f"tiktoken gpt2 (GPT-2's byte-level BPE), {tok.vocab_size} tokens (<|endoftext|> {tok.eos_id})"
        arch = (f"gpt2: dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads, MLP {c.ffn_dim} (exact GELU), "
                f"context {c.max_seq_len}, LayerNorm eps {c.norm_eps:g}, learned positions, tied embeddings")
        (tmp / "README.md").write_text(model_card(run, "transformers", dtype, arch, tok_row, "gpt2"))
        return sorted(p.name for p in tmp.iterdir())

    files = build_atomically(out, build)
    return Exported(out, files, [])


def gpt2_values(cfg: dict, where: Path) -> dict:
    """The gpt2 family's Config values of a GPT2LMHeadModel config.json (refusing what computes differently)."""
    act = cfg.get("activation_function", "gelu_new")
    if act != GPT2_ACTIVATION:
        raise UserError(f"{where}: activation_function {act!r}; lmkit's gpt2 uses exact GELU ('gelu')")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise UserError(f"{where}: attention scores not scaled by 1/sqrt(head_dim) alone; lmkit's gpt2 scales so")
    if cfg.get("add_cross_attention"):
        raise UserError(f"{where}: cross-attention; lmkit's gpt2 is decoder-only")
    if not cfg.get("tie_word_embeddings", True):
        raise UserError(f"{where}: tie_word_embeddings false; lmkit's gpt2 ties its head to the embeddings")
    dim = int(cfg.get("n_embd", cfg.get("hidden_size", 768)))
    return dict(dim=dim, n_layers=int(cfg.get("n_layer", 12)), n_heads=int(cfg.get("n_head", 12)),
                vocab_size=int(cfg["vocab_size"]), hidden_dim=int(cfg.get("n_inner") or 4 * dim),
                max_seq_len=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
                norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)))


def read_gpt2_tokenizer(folder: Path):
    """tiktoken gpt2 when vocab.json and merges.txt are GPT-2's; a sentencepiece tokenizer.model otherwise."""
    from toolkit.tokenizers.tiktoken import TiktokenTokenizer

    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = TiktokenTokenizer("gpt2")
        vocab, merges = gpt2_vocab_and_merges(tok.enc)
        try:
            theirs = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{folder}: vocab.json or merges.txt is unreadable") from None
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if theirs == vocab and pairs == merges:
            return tok
        raise UserError(f"{folder}: vocab.json/merges.txt are not GPT-2's; lmkit imports GPT-2's own vocabulary")
    if (folder / "tokenizer.model").is_file():
        return read_hf_tokenizer(folder)
    raise UserError(f"{folder}: no vocab.json/merges.txt (GPT-2's) or tokenizer.model; lmkit cannot rebuild its "
                    f"tokenizer")


def gpt2_recipe(embedded: str | None, values: dict, source: Path, tok):
    """The recipe of an imported gpt2 folder: the embedded lmkit recipe (if a gpt2 one) with the file's shape."""
    from toolkit.models.gpt2 import Config

    recipe = embedded_recipe(embedded, source, "gpt2", f"transformers {source.name}")
    base, values = recipe.model, dict(values)
    if base.ffn_dim == values["hidden_dim"]:
        values["hidden_dim"] = base.hidden_dim
    if base.vocab_size == 0 and values["vocab_size"] == tok.vocab_size:
        values["vocab_size"] = 0
    try:
        model = replace(base, **values) if isinstance(base, Config) else Config(**values)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{source}: its hyperparameters do not make a gpt2 model ({e})") from None
    if model.uses_phases or model.uses_bias:
        model = replace(model, resonance=False)
    kind = {"kind": tok.kind, "path": "tokenizer", "vocab_size": tok.vocab_size}
    if tok.kind == "tiktoken":
        kind.update(encoding=tok.encoding, vocab_cap=0, cap_policy="none")
    return recipe.replace(model=model, tokenizer=replace(recipe.tokenizer, **kind))


def open_gpt2(folder: Path, cfg: dict, device="cpu") -> Opened:
    """A transformers GPT2LMHeadModel folder as an lmkit gpt2 model, tokenizer and recipe, in memory."""
    from toolkit import models

    where = folder / CONFIG
    try:
        values = gpt2_values(cfg, where)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: missing or bad {e}") from None
    tok = read_gpt2_tokenizer(folder)
    tensors, meta = read_hf_tensors(folder)
    recipe = gpt2_recipe(meta.get(RECIPE_KEY), values, folder, tok)
    state = gpt2_from_hf_tensors(tensors, folder)
    if "tok_emb.weight" in state:
        state["lm_head.weight"] = state["tok_emb.weight"]  # tied
    model = models.build(recipe.model, values["vocab_size"], init=False)
    load_checked(model, state, True, folder, gpt2_hf_name, "config.json")
    return Opened(model.to(device).eval(), tok, recipe, int(meta.get("lmkit_step", 0) or 0))
