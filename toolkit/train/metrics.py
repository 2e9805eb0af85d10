"""What a run leaves beside its loss: samples from fixed prompts at every eval (samples.jsonl), through the one
generation loop, so runs and sweeps can be compared by what their models write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from toolkit import generate as G

SAMPLES = "samples.jsonl"


def eval_samples(model, tok, step: int, ec, window: np.ndarray | None = None) -> list[dict]:
    """One record per prompt of the recipe's [eval] prompts: {"step", "prompt", "text", "tokens", "tokens_per_s"}.
    Sampling uses its own generator seeded with eval.sample_seed, never the global RNG (a resumed run stays bit
    for bit). An encoder-decoder model (T5) writes a denoising example of `window` instead."""
    if model.is_encoder_decoder:
        return [denoise_sample(model, tok, step, ec, window)] if window is not None else []
    # the family's own sampler where it has one (the attractor's seed sampler), else the eval settings
    options = model.sampling_defaults() or {"temperature": ec.sample_temperature, "top_k": ec.sample_top_k}
    sampling = G.Sampling(**options, seed=ec.sample_seed)
    was_training = model.training
    rows = []
    for prompt in ec.prompts:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
        stats = G.Stats()
        out = list(G.stream(G.decoder_for(model), ids, ec.sample_tokens, sampling, G.stop_ids_for(tok), stats,
                            G.make_generator(ec.sample_seed)))
        rows.append({"step": step, "prompt": prompt, "text": tok.decode(out), "tokens": len(out),
                     "tokens_per_s": round(stats.tokens_per_s, 1)})
    model.train(was_training)
    return rows


def denoise_sample(model, tok, step: int, ec, window: np.ndarray) -> dict:
    """The first val window corrupted as at validation ("prompt"), its target spans and the spans the model
    generates ("text"), each as text with the sentinels in it."""
    from toolkit.shards.span_corruption import eval_batch, special_ids

    was_training = model.training
    model.eval()
    enc, tgt = eval_batch(model.config, window[None], 0)
    ids = special_ids(model.config)
    row = enc[0][enc[0] != ids.pad]
    device = next(model.parameters()).device
    start = model.config.bos_id if model.config.decoder_start == "bos" else model.config.pad_id
    stats = G.Stats()
    sampling = G.Sampling(temperature=ec.sample_temperature, top_k=ec.sample_top_k, seed=ec.sample_seed)
    out = list(G.stream(model.condition(torch.from_numpy(row).to(device)[None]), [start],
                        min(ec.sample_tokens, model.config.target_len - 1), sampling, [ids.eos], stats,
                        G.make_generator(ec.sample_seed)))
    model.train(was_training)
    return {"step": step, "prompt": tok.decode(row.tolist()), "target": tok.decode([int(t) for t in tgt[0] if t >= 0]),
            "text": tok.decode(out), "tokens": len(out), "tokens_per_s": round(stats.tokens_per_s, 1)}


def append_samples(run_dir: Path, rows: list[dict]) -> None:
    with open(Path(run_dir) / SAMPLES, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop what was logged after the checkpoint (it will be logged again)."""
    from toolkit.fsio import atomic_write_text

    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
