"""A tiny autoregressive tabular policy with exact enumeration, for testing the estimators.

π_θ(v | k, prev) = softmax(θ[k, prev] / T)[v], θ: [horizon, vocab + 1, vocab] (prev = vocab is BOS).
Token 0 is eos: a response stops after emitting it, or after `horizon` tokens (truncated, no eos).
Everything is float64 so exact values are exact to ~1e-15.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

EOS = 0


@dataclass
class Batch:
    tokens: Tensor  # [N, R] int64, EOS-padded
    mask: Tensor  # [N, R] bool
    entropies: Tensor  # [N, R] (with graph to θ when sampled with grad)
    logprobs: Tensor  # [N, R]
    top1_prob: Tensor  # [N, R] detached
    margin: Tensor  # [N, R] detached: top1 − top2 probability


class ToyPolicy:
    def __init__(self, vocab: int = 4, horizon: int = 3, temperature: float = 0.9, seed: int = 0, scale: float = 1.3):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.horizon, self.temperature = vocab, horizon, temperature
        self.theta = scale * torch.randn(horizon, vocab + 1, vocab, generator=gen, dtype=torch.float64)
        self.theta[:, :, EOS] -= 0.7  # longer responses on average, still every length is common

    @property
    def n_params(self) -> int:
        return self.theta.numel()

    def log_table(self, theta: Tensor) -> Tensor:
        return torch.log_softmax(theta / self.temperature, dim=-1)

    def token_stats(self, theta: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(H, logp, top1_prob, margin), each [N, R], zero off the mask; differentiable in θ."""
        n, r = tokens.shape
        prev = torch.cat([torch.full((n, 1), self.vocab, dtype=torch.long), tokens[:, :-1]], dim=1)
        rows = self.log_table(theta)[torch.arange(r)[None, :], prev]  # [N, R, V]
        ent = -(rows.exp() * rows).sum(-1)
        logp = rows.gather(-1, tokens[..., None])[..., 0]
        top2 = rows.detach().exp().topk(2, dim=-1).values
        m = mask.to(theta.dtype)
        return ent * m, logp * m, top2[..., 0] * m, (top2[..., 0] - top2[..., 1]) * m

    def batch(self, tokens: Tensor, mask: Tensor, theta: Tensor | None = None) -> Batch:
        theta = self.theta if theta is None else theta
        ent, logp, top1, margin = self.token_stats(theta, tokens, mask)
        return Batch(tokens, mask, ent, logp, top1, margin)

    def sample(self, n: int, gen: torch.Generator, theta: Tensor | None = None) -> Batch:
        """n responses, vectorised over sequences (a loop over the ≤ 3 positions)."""
        theta = self.theta if theta is None else theta
        table = self.log_table(theta.detach()).exp()
        tokens = torch.full((n, self.horizon), EOS, dtype=torch.long)
        mask = torch.zeros(n, self.horizon, dtype=torch.bool)
        alive = torch.ones(n, dtype=torch.bool)
        prev = torch.full((n,), self.vocab, dtype=torch.long)
        for k in range(self.horizon):
            tok = torch.multinomial(table[k, prev], 1, generator=gen)[:, 0]
            tokens[:, k] = torch.where(alive, tok, EOS)
            mask[:, k] = alive
            alive = alive & (tok != EOS)
            prev = tok
        return self.batch(tokens, mask, theta)

    def enumerate(self) -> tuple[Tensor, Tensor]:
        """Every possible response: (tokens [M, R], mask [M, R])."""
        seqs = []
        for length in range(1, self.horizon + 1):
            for body in itertools.product(range(1, self.vocab), repeat=length - 1):
                seqs.append(body + (EOS,))
        seqs += list(itertools.product(range(1, self.vocab), repeat=self.horizon))  # truncated
        tokens = torch.full((len(seqs), self.horizon), EOS, dtype=torch.long)
        mask = torch.zeros(len(seqs), self.horizon, dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return tokens, mask

    def exact_entropy(self, theta: Tensor, target: str) -> Tensor:
        """Exact H(θ) for a target by enumeration (differentiable: autograd gives the exact ∇H)."""
        tokens, mask = self.enumerate()
        ent, logp, _, _ = self.token_stats(theta, tokens, mask)
        p = logp.sum(-1).exp()
        s, length = ent.sum(-1), mask.sum(-1).to(theta.dtype)
        if target == "sequence":
            return (p * s).sum()
        if target == "token_mean":
            return (p * s).sum() / (p * length).sum()
        if target == "seq_mean_token_mean":
            return (p * s / length).sum()
        raise ValueError(target)

    def exact_gradient(self, target: str) -> Tensor:
        theta = self.theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.exact_entropy(theta, target), theta)
        return grad

    def directional(
        self, tokens: Tensor, mask: Tensor, v: Tensor, theta: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(dH, dlogp) [N, R]: directional derivatives of H_ik and logp_ik along v (forward-mode AD)."""
        theta = (self.theta if theta is None else theta).detach()
        _, (d_ent, d_logp) = torch.func.jvp(lambda th: self.token_stats(th, tokens, mask)[:2], (theta,), (v,))
        return d_ent, d_logp
