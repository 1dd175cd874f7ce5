"""Several optimizer steps per U batch (docs/math.md §4.10): the update a PPO-style trainer takes on one rollout.

TRL with steps_per_generation > gradient_accumulation_steps or num_iterations > 1, and verl/OpenRLHF with
mini-batches × PPO epochs, take k = mini_batches × epochs AdamW steps on one batch of completions. TRL shuffles
the completions, splits them into equal mini-batches and passes over them `epochs` times; the advantages stay
those computed at sampling, and after the first step the importance ratio r = π_θ/π_old departs from 1, so
the clipped surrogate drops the tokens whose ratio left [1 − ε_low, 1 + ε_high] on the side that would
increase the objective further (`update.clipped_ratio_coefficients`). The emulation runs exactly that:

    θ₀ = θ;  for each epoch, for each mini-batch M_j:  g_j = ∇J_clip(θ_{j−1}; M_j),  θ_j = AdamW(θ_{j−1}, g_j)
    Δθ = θ_k − θ₀

with the model moved in place to θ_{j−1} for each gradient (and restored bit-exactly), the AdamW state advanced
step by step (`update.adam_advance`) and each step's loss aggregation over its own mini-batch. π_old is U
teacher-forced at θ₀. The lr of every step is the checkpoint's next lr (a schedule moves it by k steps' worth:
negligible for long schedules). Which rows fall in which mini-batch is the trainer's own random draw; the
emulation draws one with `seed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .passes import backward_into
from .perturb import perturbed
from .scoring import Batch, accumulation_dtype
from .update import FlatLayout, adam_advance, clipped_ratio_coefficients, pg_coefficients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepChain:
    """k = mini_batches × epochs AdamW steps on one U batch, PPO's clipped ratio in between."""

    mini_batches: int
    epochs: int
    clip_low: float
    clip_high: float
    source: str  # where the settings came from (params, the trainer's config)
    # token-mean's denominator: each mini-batch's own tokens (verl, TRL bnpo) or the whole U batch's tokens ÷
    # mini_batches (TRL dapo/cispo: num_items_in_batch spans the generation batch)
    token_normaliser: Literal["mini_batch", "batch"] = "mini_batch"
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.mini_batches * self.epochs


@dataclass
class ChainResult:
    delta_theta: Tensor  # θ_k − θ₀, float64 [P]
    first_gradient: Tensor  # g₁ = ∇J at θ₀ on the first mini-batch
    clipped_fraction: list[float]  # per step: the share of response tokens the clipped ratio dropped


def mini_batch_rows(n_rows: int, mini_batches: int, seed: int) -> list[Tensor]:
    """Row indices of each mini-batch: a seeded permutation cut into `mini_batches` near-equal parts (TRL cuts the
    shuffled batch into equal ones; the leave-one-group-out batches need not divide evenly)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_rows, generator=generator)
    return [part for part in torch.tensor_split(order, mini_batches) if part.numel() > 0]


def rows_of(U: Batch, rows: Tensor) -> Batch:
    """The sub-batch of U's `rows` (every tensor indexed along its first axis)."""
    tensors = {k: v[rows.to(v.device)] for k, v in U.tensors.items()}
    return Batch.from_tensors(tensors, U.temperature, U.top_p, U.mask.device, U.logits_chunk_mb)


def chain_coefficients(M: Batch, update, chain: StepChain, batch_tokens: int) -> Tensor:
    """c [n, R] of mini-batch M's objective under the trainer's loss aggregation (`pg_coefficients` over M; for
    token_normaliser "batch" the token-mean denominator is the U batch's tokens ÷ mini_batches)."""
    coef = pg_coefficients(M.tensors["advantages"], M.mask, update.loss_agg_mode, update.max_len)
    if update.loss_agg_mode == "token-mean" and chain.token_normaliser == "batch":
        coef = coef * (M.mask.sum() / (batch_tokens / chain.mini_batches))
    return coef


def clipped_gradient(model, params, layout: FlatLayout, M: Batch, logp_old: Tensor, coef: Tensor, chain, max_tokens):
    """(g = ∇J_clip at the model's current θ over mini-batch M, the share of its tokens clipped away)."""
    dtype = accumulation_dtype(params[0])
    coef = coef.to(dtype)
    g = torch.zeros(layout.numel, dtype=dtype, device=coef.device)
    clipped = 0
    for rows, stats in M.scored(model, max_tokens, "U step gradient", with_grad=True, entropies=False):
        log_ratio = (stats.logprobs.detach().to(dtype) - logp_old[rows]).masked_fill(~M.mask[rows], 0.0)
        c = clipped_ratio_coefficients(coef[rows], log_ratio, M.mask[rows], chain.clip_low, chain.clip_high)
        clipped += int(((c == 0) & (coef[rows] != 0)).sum())
        backward_into([stats.logprobs], params, g, [c])
    return g, clipped / max(1, int(M.mask.sum()))


def run_chain(model, layout: FlatLayout, U: Batch, update, chain: StepChain, max_tokens: int) -> ChainResult:
    """Δθ of the k-step chain on U (see the module docstring); the model is back at θ₀ bit-exactly afterwards."""
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    dtype = accumulation_dtype(params[0])
    logp_old = U.token_stats(model, max_tokens, desc="U at θ₀")["logprobs"].to(dtype)
    parts = mini_batch_rows(len(U), chain.mini_batches, chain.seed)
    batches = [(rows_of(U, rows), logp_old[rows.to(logp_old.device)]) for rows in parts]
    state, total = update.state, torch.zeros(layout.numel, dtype=torch.float64, device=logp_old.device)
    first, fractions = None, []
    for _ in range(chain.epochs):
        for M, old in batches:
            with perturbed(model, layout.unflatten(total), 1.0):
                coef = chain_coefficients(M, update, chain, int(U.mask.sum()))
                g, fraction = clipped_gradient(model, params, layout, M, old, coef, chain, max_tokens)
            delta, state = adam_advance(g.double(), state, update.max_grad_norm)
            total = total + delta
            first = g if first is None else first
            fractions.append(fraction)
    log.info("multi-step update: %d steps, clipped token share per step %s", chain.steps, fractions)
    return ChainResult(total, first, fractions)


def momentum_chain(update, chain: StepChain) -> Tensor:
    """Δθ of the k steps with every gradient 0: momentum and weight decay alone (the chain's U-independent part)."""
    state = update.state.dense()  # θ whole (a long state reads it from the model: `update.FlatView`)
    total = torch.zeros_like(state.theta)
    for _ in range(chain.steps):
        delta, state = adam_advance(torch.zeros_like(state.theta), state, update.max_grad_norm)
        total = total + delta
    return total


def leave_one_group_out_chains(model, layout, U: Batch, update, chain: StepChain, xbar: Tensor, max_tokens: int):
    """[B] X̄·Δθ of the chain run without prompt group b, for the jackknife SE_U: B more chains (each k U passes
    over (B−1)/B of U)."""
    groups = U.tensors["group_index"]
    values = []
    for b in torch.unique(groups):
        kept = torch.nonzero(groups != b).squeeze(1)
        result = run_chain(model, layout, rows_of(U, kept), update, chain, max_tokens)
        values.append((xbar.double() * result.delta_theta).sum())
    return torch.stack(values)


__all__ = ["ChainResult", "StepChain", "leave_one_group_out_chains", "momentum_chain", "mini_batch_rows", "run_chain"]
