"""Recipes: one TOML file per model family, loaded into frozen dataclasses.

Tables: [model] (its keys depend on `family`), [tokenizer], [data], [train], [eval], [export].
Unknown keys, wrong types and impossible values are errors that name the file, the key and
what was expected. `--set table.key=value` overrides any key with the same checks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from toolkit.errors import RecipeError, UserError, check, check_choice  # noqa: F401 (configs use them)
from toolkit.fsio import atomic_write_text

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "sentencepiece"  # sentencepiece | tiktoken | bytes | audio | llama2c (a tokenizer.bin, via path)
    vocab_size: int = 4096  # sentencepiece: size to train
    encoding: str = "gpt2"  # tiktoken: encoding name
    vocab_cap: int = 0  # tiktoken: 0 = no cap
    cap_policy: str = "none"  # tiktoken with vocab_cap: "fold" (id % cap, lossy), "drop" (ids >= cap left out)
    n_sentinels: int = 100  # bytes: sentinel ids after pad/eos/bos
    path: str = ""  # an existing tokenizer folder to use instead of training one
    max_sentences: int = 2_000_000  # sentencepiece: lines sampled for training
    append_eos: bool = False  # pretokenize: EOS after each document (BOS/EOT always goes before)
    layout: str = "flatten"  # audio: codebook0 (the seed's) | flatten (frame-major, all codebooks) | delay (MusicGen)
    n_codebooks: int = 8  # audio: codebooks in the stream (flatten, delay); 8 = EnCodec 24 kHz at 6 kbps
    codebook_size: int = 1024  # audio: codes per codebook

    def __post_init__(self):
        check_choice(self.kind, "kind", ("sentencepiece", "tiktoken", "bytes", "audio", "llama2c"))
        check_choice(self.cap_policy, "cap_policy", ("none", "fold", "drop"))
        check(self.vocab_size >= 0, "vocab_size", "a size >= 0")
        check(self.kind != "llama2c" or bool(self.path), "path", "a tokenizer folder for kind 'llama2c'")
        if self.kind == "sentencepiece" and not self.path:
            check(self.vocab_size >= 260, "vocab_size", "at least 260 (3 specials + 256 byte pieces + 1)")
        check(self.vocab_cap >= 0, "vocab_cap", "0 (no cap) or a positive cap")
        if self.vocab_cap:
            check(self.cap_policy != "none", "cap_policy", "'fold' or 'drop' when vocab_cap is set")
        check(0 <= self.n_sentinels <= 4096, "n_sentinels", "between 0 and 4096")
        check(self.max_sentences > 0, "max_sentences", "a positive count")
        check_choice(self.layout, "layout", ("codebook0", "flatten", "delay"))
        check(1 <= self.n_codebooks <= 32, "n_codebooks", "between 1 and 32")
        check(2 <= self.codebook_size <= 32768, "codebook_size", "between 2 and 32768")


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # a path (folder, .md/.txt/.jsonl), "hf:NAME" or "synthetic"
    text_field: str = "text"  # .jsonl and hf: the field holding the text
    separator: str = ""  # .txt files: "" = auto (<|endoftext|> if present, else blank lines), "none", or a literal
    strip_markdown: bool = False  # remove front matter, HTML comments, code fences, link targets, directives
    skip_readme: bool = True  # folders: skip files whose name starts with README
    hf_config: str = ""
    hf_split: str = "train"
    streaming: bool = False
    max_rows: int = 0  # 0 = all
    max_chars: int = 0  # 0 = all
    val_fraction: float = 0.1
    synthetic_stories: int = 12_000  # synthetic: number of stories (about 4 MB)
    seed: int = 0  # synthetic generator seed
    shard_tokens: int = 100_000_000  # pretokenize: tokens per shard file
    chat_template: str = ""  # conversations JSONL: "llama2" (masked assistant loss) or "qa" (seed's Q:/A:, no mask)
    sampling: str = "uniform"  # train windows: "uniform" (anywhere) or "priority" (audio: centred on scored chunks)
    scores: str = ""  # priority: a .parquet from `lmkit audio score`; "" = scores.parquet in the code folder

    def __post_init__(self):
        check_choice(self.chat_template, "chat_template", ("", "llama2", "qa"))
        check_choice(self.sampling, "sampling", ("uniform", "priority"))
        check(bool(self.source), "source", "a path, 'hf:NAME' or 'synthetic'")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", "a fraction strictly between 0 and 1")
        check(self.max_rows >= 0, "max_rows", "0 (all) or a positive count")
        check(self.max_chars >= 0, "max_chars", "0 (all) or a positive count")
        check(self.synthetic_stories > 0, "synthetic_stories", "a positive count")
        check(self.shard_tokens >= 1024, "shard_tokens", "at least 1024")


OPTIMIZERS = ("adamw", "adam", "adam8bit", "sgd", "muon")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = ""  # "" = out/<recipe name>
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (autocast; master weights stay fp32)
    compile: bool = False
    parallel: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2: parameters, gradients, optimizer sharded)
    seed: int = 1337
    batch_size: int = 32  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step (global, divided across DDP ranks)
    max_iters: int = 2000
    optimizer: str = "adamw"  # adamw | adam | adam8bit (bitsandbytes on CUDA, else adam) | sgd | muon; per group
    lr: float = 5e-4
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | constant | asr (attack-sustain-release) | step (x gamma every step_size)
    warmup_iters: int = 100
    decay_iters: int = 0  # asr: linear decay over the last N steps
    decay_fraction: float = 0.2  # asr in a budgeted run: linear decay over this last fraction of the budget
    warmup_fraction: float = 0.0  # a budgeted run: warm up over this first fraction (0, no budget: warmup_iters)
    # a budget instead of max_iters: the run ends when either is used, with its lr schedule on the fraction done
    max_minutes: float = 0.0  # wall minutes, evals and checkpoints included (0 = no time budget)
    max_tokens: float = 0.0  # training tokens (0 = no token budget)
    step_size: int = 0  # step: multiply the lr by gamma every step_size steps (PyTorch's StepLR)
    gamma: float = 0.5  # step: the factor
    weight_decay: float = 0.1  # matrices only; vectors and gains get 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    eval_interval: int = 200
    eval_iters: int = 20  # val batches per eval
    log_interval: int = 10
    ckpt_interval: int = 0  # 0 = at evals and at the end
    peak_flops: float = 0.0  # for MFU; 0 = detect (known GPUs) or measure (CPU)
    plot: bool = True  # curves.png in the run folder at each eval
    tensorboard: bool = False  # event files under RUN/tensorboard/ (needs tensorboardX: pip install lmkit[tensorboard])
    groups: dict = field(default_factory=dict)  # NAME -> {lr, weight_decay, beta1, beta2, eps, momentum, optimizer}

    def __post_init__(self):
        check_choice(self.dtype, "dtype", ("auto", "float32", "bfloat16", "float16"))
        check_choice(self.schedule, "schedule", ("cosine", "constant", "asr", "step"))
        check_choice(self.parallel, "parallel", ("ddp", "fsdp"))
        check(self.schedule != "step" or self.step_size > 0, "step_size", "a positive step count for schedule 'step'")
        check(0 < self.gamma <= 1, "gamma", "a factor in (0, 1]")
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
              "auto, cpu, cuda, cuda:N or mps")
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            check(getattr(self, name) > 0, name, "a positive integer")
        for name in ("warmup_iters", "decay_iters", "ckpt_interval"):
            check(getattr(self, name) >= 0, name, "an integer >= 0")
        check(self.lr > 0, "lr", "a positive learning rate")
        check(self.max_minutes >= 0 and self.max_tokens >= 0, "max_minutes", "a budget >= 0 (0 = none)")
        check(0 < self.decay_fraction <= 1, "decay_fraction", "a fraction in (0, 1]")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", "a fraction in [0, 1) (0 = warmup_iters steps)")
        check(0 <= self.min_lr <= self.lr, "min_lr", "between 0 and lr")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "0 (off) or a positive norm")
        allowed = {"lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "optimizer"}
        for name, overrides in self.groups.items():
            check(isinstance(overrides, dict), f"groups.{name}", "a table of optimizer settings")
            unknown = set(overrides) - allowed
            check(not unknown, f"groups.{name}", f"keys among {sorted(allowed)}, got {sorted(unknown)}")
            if "optimizer" in overrides:
                check(overrides["optimizer"] in OPTIMIZERS, f"groups.{name}.optimizer", f"one of {OPTIMIZERS}")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 0  # 0 = train.batch_size
    max_batches: int = 50  # `lmkit eval`: val batches (non-overlapping windows from the start)
    # samples at every eval of a training run: each prompt's continuation goes to samples.jsonl (none = off)
    prompts: tuple[str, ...] = ()
    sample_tokens: int = 64
    sample_temperature: float = 0.8  # 0 = greedy
    sample_top_k: int = 0
    sample_seed: int = 0  # the same seed at every eval, so samples differ only by what the model learned

    def __post_init__(self):
        check(self.batch_size >= 0, "batch_size", "0 (same as train) or a positive size")
        check(self.max_batches > 0, "max_batches", "a positive count")
        check(self.sample_tokens > 0, "sample_tokens", "a positive number of tokens")
        check(self.sample_temperature >= 0, "sample_temperature", "0 (greedy) or more")
        check(self.sample_top_k >= 0, "sample_top_k", "0 (off) or a positive k")


@dataclass(frozen=True)
class ExportConfig:
    format: str = "v0"  # v0 (run.c) | v1 (fp32 with header) | v2 (int8 Q8_0, runq.c)
    group_size: int = 0  # v2: 0 = largest of 64, 32, ... dividing dim and hidden_dim

    def __post_init__(self):
        check_choice(self.format, "format", ("v0", "v1", "v2"))
        check(self.group_size >= 0, "group_size", "0 (auto) or a positive group size")


TABLES: dict[str, type] = {
    "tokenizer": TokenizerConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model: Any  # the family's Config dataclass (toolkit.models)
    tokenizer: TokenizerConfig
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    export: ExportConfig

    def to_dict(self) -> dict:
        out: dict = {"name": self.name, "description": self.description}
        out["model"] = {"family": self.model.family, **_fields_dict(self.model)}
        for table in TABLES:
            out[table] = _fields_dict(getattr(self, table))
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)


def _fields_dict(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "family"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {tp}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 2e6 in a recipe or --set means 2000000
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [value_i if item is Any else _coerce(value_i, item, where) for value_i in value]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool and not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def build_table(cls, values: dict, where: str):
    """Build the frozen dataclass `cls` from a TOML table, with errors that name `where`.key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected one of: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise UserError(f"{where}.{e.key}: expected {e}") from None


def _model_config(values: dict, where: str):
    from toolkit import models

    values = dict(values)
    family = values.pop("family", None)
    if family is None:
        raise UserError(f"{where}: missing key 'family'; expected one of: {', '.join(models.FAMILIES)}")
    if not isinstance(family, str) or family not in models.FAMILIES:
        raise UserError(f"{where}.family: unknown family {family!r}; expected one of: {', '.join(models.FAMILIES)}")
    return build_table(models.config_class(family), values, where)


def from_dict(raw: dict, source: str) -> Recipe:
    allowed = {"name", "description", "model", *TABLES}
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise UserError(f"{source}: unknown table or key {unknown[0]!r}; expected: {', '.join(sorted(allowed))}")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str):
        raise UserError(f"{source}: name: expected a string")
    tables = {}
    for table, cls in TABLES.items():
        values = raw.get(table, {})
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{table}] must be a table")
        tables[table] = build_table(cls, values, f"{source} [{table}]")
    model = _model_config(raw.get("model", {}), f"{source} [model]")
    return Recipe(name=name, description=str(raw.get("description", "")), model=model, **tables)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected table.key=value, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise UserError(f"--set {text!r}: expected table.key=value, e.g. --set train.lr=3e-4")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        table = raw.setdefault(path[0], {})
        if not isinstance(table, dict):
            raise UserError(f"--set {text!r}: {path[0]!r} is not a table")
        node = table
        for part in path[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: {part!r} is not a table")
        if isinstance(value, (int, float, bool)) and _is_str_field(path, raw):
            value = text.split("=", 1)[1]  # a string key given a number-looking value: keep the text
        node[path[-1]] = value
    return raw


def _is_str_field(path: list[str], raw: dict) -> bool:
    cls = TABLES.get(path[0])
    if path[0] == "model":  # the family's own Config
        from toolkit import models

        family = raw.get("model", {}).get("family")
        cls = models.config_class(family) if family in models.FAMILIES else None
    if cls is None or len(path) != 2:
        return False
    hints = typing.get_type_hints(cls)
    return hints.get(path[1]) is str


def resolve_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a recipe shipped in recipes/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return shipped
    raise UserError(f"recipe not found: {name_or_path} (give a .toml path or one of `lmkit recipes list`)")


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "TOML files are UTF-8") from None


def load(name_or_path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = resolve_path(str(name_or_path))
    raw = apply_overrides(read_toml(path), list(overrides))
    return from_dict(raw, str(path))


# model keys a fine-tune may change without changing what the base model is (training-time settings, and how
# attention is computed)
TRAINING_ONLY_MODEL_KEYS = {"dropout", "attention_dropout", "attention"}


def load_onto(name_or_path: str | Path, overrides: list[str], base: Recipe, base_name: str) -> Recipe:
    """A fine-tuning recipe on top of the run it starts from: the base run's [model] is the default, so the recipe
    need not repeat the base's shape; a key the recipe (or --set) gives that contradicts the base is an error
    naming both values (training-only keys such as dropout may differ)."""
    path = resolve_path(str(name_or_path))
    raw = apply_overrides(read_toml(path), list(overrides))
    given = dict(raw.get("model", {}))
    family = given.pop("family", base.model.family)
    if family != base.model.family:
        raise UserError(f"{path} [model]: family = {family!r}, but {base_name} is a {base.model.family!r} model")
    base_values = _fields_dict(base.model)
    for key, value in given.items():
        if key in TRAINING_ONLY_MODEL_KEYS or key not in base_values:
            continue  # an unknown key is reported by from_dict below, with the table's other checks
        if key == "vocab_size" and value == 0:
            continue  # "the tokenizer's": the base's tokenizer is used
        if value != base_values[key]:
            raise UserError(f"{path} [model]: {key} = {value!r}, but {base_name} has {key} = {base_values[key]!r} "
                            f"(leave {key} out to take the base run's)")
    raw["model"] = {"family": family, **base_values, **{k: v for k, v in given.items()
                                                        if k in TRAINING_ONLY_MODEL_KEYS or k not in base_values}}
    return from_dict(raw, str(path))


def save(recipe: Recipe, path: Path) -> None:
    atomic_write_text(path, recipe.to_toml())


def shipped() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.toml"))
