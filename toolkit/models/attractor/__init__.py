"""The attractor family (BoggersTheLLM): an attention-free window model relaxed by energy descent.

A window of the last W tokens is embedded (embedding, LayerNorm without affine, L2-normalised rows),
relaxed for `steps` outer steps (positional coupling, S <- S - dt * grad E with per-wave energy MLPs,
per-wave normalisation, tension-triggered directional breaks) and read out by one Linear over the
flattened window, divided by a learned temperature. See docs/attractor.md and seeds.md section 1.

Token stream mapping: `forward(idx (B, T))` scores every position t with the window of tokens t-W+1..t
(left-padded with the row's first token where t < W-1). In training with `train_positions = P > 0`
only the last P positions of each row are scored and the returned logits are (B, P, V); evaluation and
generation always get (B, T, V). The seed trains one full window per row: `train_positions = 1`.
The seed's batch-wide rules (the energy mean, the break decisions) act on the B windows at one position,
so a position's logits depend only on its own window (and generation at B = 1 is the seed's).

Faithful by default (the seed as its code runs, seeds.md 1.2):
- each energy step starts from a detached copy of the coupled state, so gradient crosses outer steps
  only through the break term (`backprop_through_relaxation = true` keeps the whole graph);
- the energy is a mean over the batch rows and the W positions, so the step per position is
  dt / (B * W) and depends on the batch (`per_sample_energy = true`: dt / W);
- the "repulsion" term is subtracted, which attracts (`repulsion_sign = 1` makes it repel), and compares the mean
  last-position state of the batch (`repulsion_pool = "window"`: the whole window, lmkit's earlier reading);
- the token aux CE's extra noise fires below the seed's entropy floor, about 2.2 nats (`entropy_floor = "lmkit"`:
  1 + T, about 1.25), and its -1 repeat penalties count a repeated token once (`stack_repeat_penalties = true`:
  once per occurrence). tests/test_attractor_seed.py checks every term and the gradient against the seed's formulas.

Modules: `model` (Config, Model, readouts, the loss terms and the eval metric) and `relax` (the relaxation:
the fast path with its hand-written backward, and the seed-style loop of `vectorized = false`).
"""

from toolkit.models.attractor.model import Config, Model

__all__ = ["Config", "Model"]
