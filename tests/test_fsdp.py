"""train.parallel = "fsdp": FSDP2 under torchrun (2 gloo processes on CPU), checkpoints in the single-process layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file

from toolkit import models
from toolkit import recipe as recipe_lib
from toolkit import run as run_lib
from toolkit.errors import RecipeError
from toolkit.train.loop import resume_recipe, train

ROOT = Path(__file__).resolve().parent.parent
SETS = ["train.max_iters=6", "train.eval_interval=3", "train.grad_clip=0.05"]  # clipping acts at every step


def fsdp_unavailable() -> str:
    """Why FSDP2 cannot run here ('' when it can)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"no FSDP2 in this torch build ({e})"
    return ""


pytestmark = pytest.mark.skipif(bool(fsdp_unavailable()), reason=fsdp_unavailable() or "-")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def torchrun(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "toolkit", "--quiet", "train", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def fsdp_sets(*extra: str) -> list[str]:
    out = []
    for s in [*SETS, "train.parallel=fsdp", *extra]:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run and an uninterrupted sharded run of the same recipe."""
    tmp = tmp_path_factory.mktemp("fsdp")
    recipe = tmp / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    train(recipe_lib.load(recipe, [*SETS, 'eval.prompts=["Once upon"]']), tmp / "single")
    torchrun(str(recipe), "--out", str(tmp / "fsdp"), *fsdp_sets('eval.prompts=["Once upon"]'))
    return tmp


def test_fsdp_two_gloo_processes_equal_a_single_process(runs):
    single, sharded = runs / "single", runs / "fsdp"
    assert json.loads((sharded / "run.json").read_text())["world_size"] == 2
    a, b = losses(single), losses(sharded)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-5)
    wa, wb = load_file(single / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert wa.keys() == wb.keys()  # the tied head is left out, as a single process leaves it out
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    sa, sb = torch.load(single / "state.pt"), torch.load(sharded / "state.pt")  # the same layout
    for oa, ob in zip(sa["optimizers"], sb["optimizers"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
        assert all(torch.allclose(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"], atol=1e-6) for i in oa["state"])
    # rank 0 samples an unsharded copy of the gathered weights: the single process's samples, at every eval
    samples = [[json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()] for run in (single, sharded)]
    assert [r["step"] for r in samples[1]] == [3, 6] and samples[1][0]["prompt"] == "Once upon"
    assert [r["text"] for r in samples[1]] == [r["text"] for r in samples[0]]
    assert all(r["tokens"] > 0 for r in samples[1])
    loaded = run_lib.load_run(sharded)  # a sharded run loads like any other
    assert loaded.step == 6 and loaded.recipe.train.parallel == "fsdp"
    assert loaded.recipe.eval.prompts == ("Once upon",)  # the saved recipe keeps them


def test_fsdp_resume_equals_an_uninterrupted_sharded_run(runs, tmp_path):
    split = tmp_path / "split"
    torchrun(str(runs / "tiny.toml"), "--out", str(split), "--stop-after", "2", *fsdp_sets())
    assert run_lib.load_run(split).step == 2
    shutil.copytree(split, tmp_path / "split_single")
    torchrun(str(split), "--resume")
    straight = load_file(runs / "fsdp" / "model.safetensors")
    resumed = load_file(split / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
    assert losses(split) == pytest.approx(losses(runs / "fsdp"), rel=1e-6)
    loaded = run_lib.load_run(split)
    assert loaded.step == 6
    x = torch.randint(0, loaded.tokenizer.vocab_size, (1, 8))
    assert torch.isfinite(loaded.model(x)[0]).all()
    # the sharded checkpoint is a single process's: one process resumes it too
    other = tmp_path / "split_single"
    train(resume_recipe(other, []), other, resume=True)  # train.parallel = fsdp in one process: plain training
    single = load_file(runs / "single" / "model.safetensors")
    assert all(torch.allclose(single[k], w, atol=1e-5) for k, w in load_file(other / "model.safetensors").items())


def test_fsdp_in_bf16_tracks_the_fp32_curve(runs, tmp_path):
    """bf16: the blocks compute with bf16 weights (MixedPrecisionPolicy), gloo all-gathers them, gradients are
    reduced in fp32 into the fp32 shards."""
    from toolkit.device import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16")
    torchrun(str(runs / "tiny.toml"), "--out", str(tmp_path / "bf16"), *fsdp_sets("train.dtype=bfloat16"))
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"
    a, b = losses(runs / "fsdp"), losses(tmp_path / "bf16")
    assert a != b and b == pytest.approx(a, rel=0.02)


def test_parallel_is_ddp_or_fsdp():
    assert recipe_lib.TrainConfig().parallel == "ddp"
    with pytest.raises(RecipeError, match="one of 'ddp', 'fsdp', got 'zero3'") as e:
        recipe_lib.TrainConfig(parallel="zero3")
    assert e.value.key == "parallel"


def test_transformer_blocks_are_found_without_a_family_name():
    from toolkit.train.distributed import transformer_blocks

    small = {"llama": dict(dim=32, n_layers=3, n_heads=4, vocab_size=64),
             "gpt2": dict(dim=32, n_layers=2, n_heads=4, vocab_size=64),
             "pgpt": dict(dim=32, n_layers=2, n_heads=2, head_dim=16, vocab_size=64),
             "t5": dict(dim=16, n_layers=2, n_heads=2, head_dim=8, ff_mult=2, vocab_size=359, max_seq_len=48,
                        max_target_len=32, pad_id=256, eos_id=257, bos_id=258, sentinel_start=259, n_sentinels=100)}
    for family, kw in small.items():
        model = models.build(models.config_class(family)(**kw))
        blocks = transformer_blocks(model)
        assert len(blocks) == kw["n_layers"] * (2 if family == "t5" else 1), family  # T5: encoder and decoder
        assert all(any(True for _ in b.parameters()) for b in blocks)
    assert transformer_blocks(torch.nn.Linear(2, 2)) == []  # none: the root is the only FSDP unit


def test_gathering_and_loading_the_full_state_on_one_process(tmp_path):
    """The checkpoint code itself on a one-process group: the gathered weights and optimizer state equal an
    unsharded twin's (weights_dict, opt.state_dict()) after a step, and load back into a fresh sharded model."""
    import torch.distributed as dist

    from toolkit.train import distributed as D
    from toolkit.train.optim import build_optimizers

    cfg = models.config_class("llama")(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16)
    tc = recipe_lib.TrainConfig(grad_clip=0.0)

    def step(model, opts):
        torch.manual_seed(1)
        x = torch.randint(0, 64, (2, 16))
        model(x, x)[1].backward()
        for o in opts:
            o.step()
            o.zero_grad()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = models.build(cfg, 64)
        torch.manual_seed(0)
        sharded = D.shard_model(models.build(cfg, 64), torch.float32)
        assert D.is_sharded(sharded) and not D.is_sharded(plain)
        assert D.tied_aliases(sharded) == {"output.weight": "tok_embeddings.weight"}
        plain_opts, sharded_opts = build_optimizers(plain, tc, "cpu"), build_optimizers(sharded, tc, "cpu")
        step(plain, plain_opts)
        step(sharded, sharded_opts)
        weights, states = D.gather_full_state(sharded, sharded_opts)
        expected = run_lib.weights_dict(plain)
        assert weights.keys() == expected.keys()
        assert all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in expected)
        for got, want in zip(states, [o.state_dict() for o in plain_opts], strict=True):
            assert got["param_groups"] == want["param_groups"]
            assert got["state"].keys() == want["state"].keys()
            for i, s in want["state"].items():
                assert all(torch.allclose(got["state"][i][k], v, atol=1e-6) for k, v in s.items())
        torch.manual_seed(7)  # another init: everything must come from the checkpoint
        fresh = D.shard_model(models.build(cfg, 64), torch.float32)
        fresh_opts = build_optimizers(fresh, tc, "cpu")
        D.load_full_state(fresh, fresh_opts, weights, states)
        again, again_states = D.gather_full_state(fresh, fresh_opts)
        assert all(torch.equal(again[k], weights[k]) for k in weights)
        for a, b in zip(again_states, states, strict=True):
            assert all(torch.equal(a["state"][i][k], v) for i, s in b["state"].items() for k, v in s.items())
        step(fresh, fresh_opts)  # and training goes on from there
        step(plain, plain_opts)
        w2, _ = D.gather_full_state(fresh, fresh_opts)
        assert all(torch.allclose(w2[k], v, atol=1e-6) for k, v in run_lib.weights_dict(plain).items())
    finally:
        dist.destroy_process_group()


def test_muon_is_refused_under_fsdp_in_one_line(tmp_path):
    """torch.optim.Muon on FSDP2's shards orthogonalises each shard (measured: weights 4e-3 off a single process's
    after 4 steps at lr 0.02, where AdamW matches to 1e-5), so the trainer refuses it."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    proc = torchrun(str(recipe), "--out", str(tmp_path / "m"), *fsdp_sets("train.groups.matrix.optimizer=muon"),
                    ok=False)
    assert proc.returncode != 0
    assert ('optimizer = "muon" (train.groups.matrix) does not run under train.parallel = fsdp: torch.optim.Muon '
            "would orthogonalise each process's shard") in proc.stderr
    assert "toolkit/train" not in proc.stderr  # no traceback of ours (torchrun adds its own for a failed child)
