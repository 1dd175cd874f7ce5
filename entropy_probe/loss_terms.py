"""The trainer's objective beyond the policy-gradient term: an entropy bonus and token masks (docs/math.md §12).

The U objective the emulated step ascends is

    J(θ) = Σ_ij keep_ij c_ij ℓ_ij(θ) + β_H Σ_ij w_ij H_ij(θ) − β_KL Σ_ij w_ij KL_ij(θ)

with c = `update.pg_coefficients` (the loss aggregation's weights times A_i), w the same weights with A = 1
(verl and TRL aggregate their entropy and KL terms like the policy loss), H_ij the entropy of the policy at
U's position j, keep_ij ∈ {0, 1} a token mask and KL_ij = exp(r_ij − ℓ_ij) − (r_ij − ℓ_ij) − 1 the k3 estimate
of KL(π_θ ‖ π_ref) that TRL's GRPO and verl (low_var_kl) use, r_ij = log π_ref(y_ij). The KL term depends on θ
through ℓ alone, ∂KL_ij/∂ℓ_ij = 1 − exp(r_ij − ℓ_ij), so it only changes ℓ's coefficient:
c_ij → keep_ij c_ij − β_KL w_ij (1 − exp(r_ij − ℓ_ij)). For a LoRA policy the reference is the base (the
adapter switched off), as TRL takes it; a full-parameter checkpoint does not hold its reference. A masked token loses its policy-gradient term but stays in the aggregation's
denominator, as Clip-Cov does (it detaches the clipped tokens' loss). Masks, from U's recorded log-probs and
entropies (those of the policy that drew U):
    top_cov          the top fraction of tokens by Cui et al.'s centred covariance (ℓ − mean ℓ)(A − mean A)
    top_entropy      the top fraction of tokens by H (the high-entropy "forking" tokens)
    bottom_entropy   the bottom fraction of tokens by H
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ProbeError

TOKEN_MASKS = ("none", "top_cov", "top_entropy", "bottom_entropy")


def covariance_terms(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """[N, R] float64 (ℓ_ij − mean ℓ)(A_i − mean A), means over U's response tokens (0 on padding); their mean
    is `passes.token_advantage_covariance`."""
    m = mask.bool()
    logp = logprobs.double()
    adv = advantages.double()[:, None].expand_as(logp)
    centred = (logp - logp[m].mean()) * (adv - adv[m].mean())
    return torch.where(m, centred, torch.zeros_like(centred))


def top_fraction(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """[N, R] bool: the round(fraction × tokens) response tokens with the largest scores (ties: the first)."""
    m = mask.bool()
    k = int(round(fraction * int(m.sum())))
    chosen = torch.zeros_like(m)
    if k == 0:
        return chosen
    flat = torch.where(m, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.float64)).flatten()
    chosen.view(-1)[torch.topk(flat, k, sorted=False).indices] = True
    return chosen


@dataclass(frozen=True)
class LossTerms:
    """What the trainer's loss adds to the policy-gradient term: β_H and a token mask (`none`: the plain loss)."""

    entropy_coef: float = 0.0
    token_mask: str = "none"
    mask_fraction: float = 0.0
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.token_mask not in TOKEN_MASKS:
            raise ProbeError(f"unknown token mask '{self.token_mask}'", f"use one of {', '.join(TOKEN_MASKS)}")
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise ProbeError(f"token mask fraction {self.mask_fraction} is not in [0, 1]", "use a fraction")
        if not (math.isfinite(self.entropy_coef) and math.isfinite(self.kl_coef)):
            raise ProbeError(
                f"loss coefficients {self.entropy_coef}, {self.kl_coef} are not finite", "use finite numbers"
            )

    @property
    def plain(self) -> bool:
        """Whether J is the policy-gradient term alone."""
        no_mask = self.token_mask == "none" or self.mask_fraction == 0.0
        return self.entropy_coef == 0.0 and self.kl_coef == 0.0 and no_mask

    def dropped(self, logprobs: Tensor, entropies: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """[N, R] bool: the tokens the mask drops (none when token_mask is none)."""
        if self.token_mask == "none":
            return torch.zeros_like(mask, dtype=torch.bool)
        if self.token_mask == "top_cov":
            return top_fraction(covariance_terms(logprobs, advantages, mask), mask, self.mask_fraction)
        sign = 1.0 if self.token_mask == "top_entropy" else -1.0
        return top_fraction(sign * entropies.double(), mask, self.mask_fraction)

    def describe(self) -> str:
        parts = []
        if self.entropy_coef:
            parts.append(f"entropy bonus β_H {self.entropy_coef:g}")
        if self.kl_coef:
            parts.append(f"KL penalty β_KL {self.kl_coef:g}")
        if self.token_mask != "none" and self.mask_fraction:
            parts.append(f"{self.token_mask} mask of {self.mask_fraction:g} of the tokens")
        return ", ".join(parts) or "policy-gradient term only"


@dataclass
class UCoefficients:
    """Per-token weights of J's two outputs over U: ℓ_ij gets `logp`, H_ij gets `entropy` (None: no bonus)."""

    logp: Tensor
    entropy: Tensor | None = None

    @classmethod
    def of(
        cls, terms: LossTerms, pg: Tensor, weights: Tensor | None, U_tensors: dict, mask: Tensor, kl_slope=None
    ) -> "UCoefficients":
        """From the policy-gradient coefficients `pg`, the aggregation weights `weights` (pg with A = 1; needed for
        an entropy bonus or KL penalty) and, for a KL penalty, kl_slope = 1 − exp(r − ℓ) [N, R] (`kl_slope`)."""
        drop = terms.dropped(U_tensors["logprobs"], U_tensors["entropies"], U_tensors["advantages"], mask)
        logp = torch.where(drop, torch.zeros_like(pg), pg)
        if terms.kl_coef:
            logp = logp - terms.kl_coef * weights * kl_slope.to(logp.dtype)
        entropy = None if terms.entropy_coef == 0.0 else terms.entropy_coef * weights
        return cls(logp, entropy)

    def rows(self, rows: slice) -> list[Tensor]:
        """The grad_outputs of one microbatch's outputs (`outputs`)."""
        return [self.logp[rows]] + ([] if self.entropy is None else [self.entropy[rows]])

    def outputs(self, stats) -> list[Tensor]:
        """The per-token outputs these coefficients weigh: [ℓ] or [ℓ, H] of a `TokenStats`."""
        return [stats.logprobs] + ([] if self.entropy is None else [stats.entropies])

    @property
    def needs_entropies(self) -> bool:
        return self.entropy is not None


def kl_slope(policy_logprobs: Tensor, reference_logprobs: Tensor, mask: Tensor) -> Tensor:
    """∂KL_ij/∂ℓ_ij = 1 − exp(r_ij − ℓ_ij) of the k3 estimate, [N, R] float64 (0 on padding)."""
    slope = 1.0 - torch.exp(reference_logprobs.double() - policy_logprobs.double())
    return torch.where(mask.bool(), slope, torch.zeros_like(slope))


__all__ = ["TOKEN_MASKS", "kl_slope", "LossTerms", "UCoefficients", "covariance_terms", "top_fraction"]
