"""The attractor's relaxation written out from seeds.md 1.2, position by position and head by head: the one
reference the tests compare the model's relaxation with (slow: for tiny models only). It shares no code with
toolkit.models.attractor; it reads the model's parameters and config.

It takes the seed's switches (detached energy steps, per-wave normalisation) plus `breaks`, `per_sample_energy`
and `energy_rows`. Its only tie to the implementation is the order of random numbers: the random directions a
break takes where a state did not change are drawn first, one per (position, window), as the model draws them,
so that the loss terms drawn after the relaxation see the same random stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_wave_unit(v: torch.Tensor, H: int) -> torch.Tensor:
    """v (..., D) with each of its H waves divided by its norm (clamped at 1e-12)."""
    d = v.shape[-1] // H
    return torch.cat([v[..., h * d : (h + 1) * d] / v[..., h * d : (h + 1) * d].norm(dim=-1, keepdim=True)
                      .clamp_min(1e-12) for h in range(H)], -1)


def window_tension(s: torch.Tensor) -> torch.Tensor:
    """One window s (W, D): mean over neighbours of the mean squared step + 0.35 * mean (1 - cos)."""
    W = s.shape[0]
    sq = sum(((s[i + 1] - s[i]) ** 2).mean() for i in range(W - 1)) / (W - 1)
    cos = sum(F.cosine_similarity(s[i + 1], s[i], dim=0) for i in range(W - 1)) / (W - 1)
    return sq + 0.35 * (1 - cos)


def relax(m, S0: torch.Tensor, rows: int, keep_states: bool = False):
    """The seed's relaxation of S0 (N, W, D), N = rows * P windows, row-major: the windows n with n % P == p form
    the seed batch of position p. Returns (final state (N, W, D), the post-step states, the last tension (N,))."""
    c = m.config
    assert c.normalize_states and not c.backprop_through_relaxation, "the reference has the seed's switches"
    N, W, D = S0.shape
    H, d, P = c.n_waves, c.wave_dim, N // rows
    direction = F.normalize(torch.randn(W, N, D, device=S0.device, dtype=S0.dtype), dim=-1)
    sp = F.softplus
    gamma, scale, cdt, asym = sp(m.coupling_gamma), sp(m.coupling_scale), sp(m.coupling_dt), m.coupling_asym
    batch = 1 if c.per_sample_energy else (c.energy_rows or rows)  # the energy is a mean over the batch rows
    create_graph = torch.is_grad_enabled()
    S, low = S0, [0] * P
    states = []
    for k in range(c.steps):
        start = S
        # the coupling: S_i += dt * scale * sum_{j != i} w_ij (S_j - S_i) (the same weights for every wave)
        coupled = []
        for i in range(W):
            acc = torch.zeros_like(S[:, i])
            for j in range(W):
                if j != i:
                    sign = 1.0 if j > i else -1.0
                    w = torch.exp(-gamma * abs(i - j)) * torch.clamp(1 + 1.25 * torch.tanh(asym) * sign, min=0.2)
                    acc = acc + w * (S[:, j] - S[:, i])
            coupled.append(S[:, i] + cdt * scale * acc)
        coupled = torch.stack(coupled, 1)
        # the energy step from a detached copy: E = mean over rows of (mean over positions of sum over heads)
        with torch.enable_grad():
            x = coupled.detach().requires_grad_()
            e = 0
            for w_ in range(W):
                for h in range(H):
                    u = x[:, w_, h * d : (h + 1) * d]
                    e = e + torch.tanh(u @ m.energy_w1[h].t() + m.energy_b1[h]) @ m.energy_w2[h] + m.energy_b2[h]
            E = (e / W).sum() / batch
            (g,) = torch.autograd.grad(E, x, create_graph=create_graph)
        S = x - c.dt * g
        S = torch.where(torch.isfinite(S), S, torch.zeros_like(S))  # the seed zeroes non-finite values
        S = per_wave_unit(S, H)
        with torch.set_grad_enabled(k == c.steps - 1 and torch.is_grad_enabled()):  # the loss uses the last one
            T = torch.stack([window_tension(S[n]) for n in range(N)])
        if c.breaks:
            out = list(S.unbind(0))
            for p in range(P):
                group = list(range(p, N, P))
                t = T.detach()[group]
                low[p] = low[p] + 1 if t.mean().item() < 0.08 else 0
                if not (t.max().item() > 0.18 or low[p] >= 4):
                    continue
                low[p] = 0
                alpha = 0.1 * min(max((0.12 - t.mean().item()) / 0.12, 0.1), 2.0)
                for n in group:
                    moved = []
                    for w_ in range(W):
                        delta = S[n, w_] - start[n, w_]
                        norm = delta.norm()
                        u = delta / norm if norm.item() > 1e-6 else direction[w_, n]  # no change: a random one
                        moved.append(per_wave_unit(S[n, w_] + alpha * u, H))
                    out[n] = torch.stack(moved)
            S = torch.stack(out)
        if keep_states:
            states.append(S)
    return S, states, T
