"""Which U tokens move entropy: per-token shares of δH₁ and the single-token proxies beside them (docs/math.md §12).

With u = (∂Δθ/∂g)ᵀ X̄ (the update rule's linearisation at the U gradient g; exact for sgd, where u = lr·X̄),
δH₁'s gradient part is, to first order in g, u·g = Σ_ij a_ij with

    a_ij = c_ij ∇ℓ_ij·u  (+ β_H w_ij ∇H_ij·u under an entropy bonus)      (`passes.u_token_terms`)

one directional derivative per token, all from one double-backward pass over U. The proxies users rank tokens
by, all from U's own numbers (no gradient):
    cov_ij    = (ℓ_ij − mean ℓ)(A_i − mean A)      Cui et al.'s centred covariance (Clip-Cov/KL-Cov select by it;
                                                    a positive one predicts an entropy drop)
    logit_ij  = −c_ij p_ij (ℓ_ij + H_ij)           the entropy change at the token's own position when only the
                                                    sampled token's logit moves along its policy gradient
and the "forking" tokens: the top fraction of U's tokens by H.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .loss_terms import covariance_terms, top_fraction

CANCELLED = 1e-3  # |Σ a| below this fraction of Σ |a|: the shares' denominator is round-off, not a total


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n−1 of a 1-D tensor, ties sharing their mean rank (float64)."""
    values, inverse = torch.unique(x.double(), sorted=True, return_inverse=True)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(x, dtype=torch.float64)
    )
    first = torch.cumsum(counts, 0) - counts
    return (first + (counts - 1) / 2)[inverse]


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation (None when either side is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return None if denominator == 0.0 else float((rx * ry).sum()) / denominator


@dataclass
class TokenTable:
    """Every U response token's share of δH₁ and its proxies, flattened over (row, position) in row order."""

    row: Tensor  # [T] U row
    position: Tensor  # [T] position in the response
    token_id: Tensor  # [T]
    a: Tensor  # [T] a_ij: the token's share of the linearised gradient part
    coefficient: Tensor  # [T] c_ij (0 for a token a mask drops)
    advantage: Tensor  # [T] A_i
    logprob: Tensor  # [T] ℓ_ij
    entropy: Tensor  # [T] H_ij
    cov: Tensor  # [T] Cui's centred covariance term
    logit_proxy: Tensor  # [T] −c p (ℓ + H)
    forking: Tensor  # [T] bool: among the top forking fraction by H
    clip_cov: Tensor  # [T] bool: among the top Clip-Cov fraction by cov

    @classmethod
    def of(cls, a, coef, U_tensors: dict, mask, entropies, forking_fraction: float, clip_cov_fraction: float):
        """The table from per-token [N, R] a, c and H (the policy's; U's recorded log-probs and advantages)."""
        m = mask.bool()
        rows, positions = m.nonzero(as_tuple=True)
        logp = U_tensors["logprobs"].double()
        advantages = U_tensors["advantages"].double()
        cov = covariance_terms(logp, advantages, mask)
        logit = -coef.double() * logp.exp() * (logp + entropies.double())
        n_prompt_cols = U_tensors["input_ids"].shape[1] - mask.shape[1]
        return cls(
            row=rows,
            position=positions,
            token_id=U_tensors["input_ids"][:, n_prompt_cols:][m],
            a=a.double()[m],
            coefficient=coef.double()[m],
            advantage=advantages[:, None].expand_as(logp)[m],
            logprob=logp[m],
            entropy=entropies.double()[m],
            cov=cov[m],
            logit_proxy=logit[m],
            forking=top_fraction(entropies, mask, forking_fraction)[m],
            clip_cov=top_fraction(cov, mask, clip_cov_fraction)[m],
        )

    def __len__(self) -> int:
        return len(self.a)

    def share(self, selected: Tensor) -> float | None:
        """Σ a over the selected tokens ÷ Σ a; None when Σ a cancels to below CANCELLED of Σ |a| (under binding
        clipping u ⟂ g, so Σ a = u·g ≈ 0 and a share of it means nothing: see `magnitude_share`)."""
        total = float(self.a.sum())
        if abs(total) <= CANCELLED * float(self.a.abs().sum()):
            return None
        return float(self.a[selected].sum()) / total

    def magnitude_share(self, selected: Tensor) -> float | None:
        """Σ |a| over the selected tokens ÷ Σ |a| (None when every a is 0): how much of the tokens' push, either
        way, the selection carries — defined under clipping too."""
        total = float(self.a.abs().sum())
        return None if total == 0.0 else float(self.a[selected].abs().sum()) / total

    def lowering(self, k: int) -> Tensor:
        """Indices of the k tokens with the most negative a (those pushing entropy down most), most negative first."""
        order = torch.argsort(self.a, stable=True)
        return order[: min(k, len(self))]


__all__ = ["TokenTable", "average_ranks", "spearman"]
