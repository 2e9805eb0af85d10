"""Run folders: model.safetensors, recipe.toml (resolved), tokenizer/, state.pt, metrics.jsonl, run.json.

Each file is written to a temporary name and renamed, so a crash never leaves a half-written file;
the step is recorded in both the weights' metadata and state.pt, and a mismatch is refused.
Nothing is unpickled: weights are safetensors and state.pt is loaded with weights_only=True.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from toolkit import recipe as recipe_lib
from toolkit import tokenizers
from toolkit.errors import UserError
from toolkit.fsio import atomic_write, atomic_write_json

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
RECIPE = "recipe.toml"
STATE = "state.pt"
METRICS = "metrics.jsonl"
RUN_INFO = "run.json"
TOKENIZER = "tokenizer"


def is_run(path: Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / RECIPE).is_file()


def weights_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without duplicated (tied) tensors: the first name of each shared tensor is kept."""
    model = getattr(model, "_orig_mod", model)
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else name
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module, path: Path, step: int = 0) -> None:
    from safetensors.torch import save_file

    atomic_write(Path(path), lambda tmp: save_file(weights_dict(model), str(tmp), metadata={"step": str(step)}))


def load_weights(model: torch.nn.Module, path: Path) -> int:
    """Load weights into `model`; returns the step recorded with them."""
    from safetensors.torch import load_file

    tensors, step = _read_weights(load_file, path)
    model = getattr(model, "_orig_mod", model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors and not _is_tied_alias(model, k, tensors)]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the recipe's model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, t in tensors.items():
        if expected[k].shape != t.shape:
            raise UserError(f"{path}: {k} has shape {tuple(t.shape)}, the recipe's model needs {tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=False)
    return step


def _read_weights(load_file, path: Path) -> tuple[dict, int]:
    """(tensors, step) of a model.safetensors, read by safetensors' torch or numpy `load_file`."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n)).get("__metadata__", {}) or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    step = meta.get("step", "0")
    if not (isinstance(step, str) and step.isdecimal()):
        raise UserError(f"{path}: its metadata's step should be a whole number, got {step!r}")
    return tensors, int(step)


def _is_tied_alias(model, name: str, tensors: dict) -> bool:
    state = model.state_dict()
    ptr = state[name].data_ptr()
    return any(k in tensors for k, t in state.items() if k != name and t.data_ptr() == ptr)


def save_state(state: dict, path: Path) -> None:
    import torch

    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file or one with pickled objects
        reason = " ".join(f"{type(e).__name__}: {str(e)[:200]}".split())  # one line: torch's messages have several
        raise UserError(f"{path}: cannot read the training state ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UserError(f"{path}: not a training state (expected a table with a step; got {type(state).__name__})")
    return state


def write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj)


def read_info(path: Path) -> dict:
    """run.json: a JSON object ({} when the file is missing)."""
    if not Path(path).is_file():
        return {}
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # recursion: nested too deeply
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


@dataclass
class Run:
    path: Path
    recipe: recipe_lib.Recipe
    tokenizer: object
    model: torch.nn.Module
    step: int
    info: dict


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """A trained model from its run folder, ready for eval, generation or export. device "numpy": the model is
    the family's torch-free one for generation (models.numpy_model: a standard fp32 llama), loaded without torch,
    when there is one; else the torch model on the CPU."""
    from toolkit import models

    path = Path(path)
    if not path.exists():
        raise UserError(f"run folder not found: {path}")
    if not is_run(path):
        raise UserError(f"{path} is not a run folder (needs {WEIGHTS} and {RECIPE}; make one with `lmkit train`)")
    recipe = recipe_lib.load(path / RECIPE)
    tok = tokenizers.load(path / TOKENIZER)
    if device == "numpy":
        device = "cpu"
        model, step = _numpy_model(recipe.model, path / WEIGHTS, tok.vocab_size)
        if model is not None:
            return Run(path, recipe, tok, model, step, read_info(path / RUN_INFO))
    model = models.build(recipe.model, tok.vocab_size, init=False)
    step = load_weights(model, path / WEIGHTS)
    info = read_info(path / RUN_INFO)
    return Run(path, recipe, tok, model.to(device).eval(), step, info)


def _numpy_model(config, path: Path, vocab_size: int):
    """(models.numpy_model of the weights file, step), or (None, 0): the family has none, or the file holds what it
    cannot take (a bf16 file, other names or shapes), and the torch loader says what is wrong."""
    from safetensors.numpy import load_file

    from toolkit import models

    if not models.has_numpy_model(config):
        return None, 0
    try:
        tensors, step = _read_weights(load_file, path)
    except (UserError, TypeError):  # numpy has no bfloat16: safetensors' numpy reader raises TypeError
        return None, 0
    return models.numpy_model(config, tensors, vocab_size), step


LOCK = "train.lock"


def lock(run_dir: Path) -> Path:
    """Claim a run folder for one training process: `train.lock` holds the owner's pid. A second `lmkit train`
    into the same folder is refused while the owner lives; a lock whose process is gone (killed) is taken over."""
    path = Path(run_dir) / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise UserError(f"{run_dir} is being trained by process {pid}; wait for it to finish, or stop it "
                                f"(a lock left by a process that is gone is taken over)") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return path
    raise UserError(f"{run_dir}: could not take {LOCK} (another process keeps making it)")


def unlock(run_dir: Path) -> None:
    path = Path(run_dir) / LOCK
    try:
        if int(path.read_text().strip() or 0) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs: a killed one that its parent has not reaped yet (a zombie) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):  # no /proc (macOS): trust kill(0)
        return True
