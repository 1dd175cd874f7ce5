"""The forecast of the trainer's next step: δH₁ + δH₂ along the step a batch of the *trainer's* size would take,
with the spread of the trainer's own draw simulated through the real update rule (docs/math.md §11.2).

The trainer steps on B_T prompt groups; the probe drew a pool of n = B_U groups (n > B_T, so that its own noise
is a fraction B_T/n of the trainer's). A trainer draw S is B_T of the pool's groups drawn with replacement (the
m-out-of-n bootstrap), taken through the real rule — clipping and AdamW included — from the per-group gradients
delta-h1 kept (`DeltaH1Estimate.u_group_gradients`, each with the full pool's normaliser 1/D):

    g_S = (Σ_{b∈S} g_b) · D / D_S,      Δθ_S = rule(g_S)

(D_S = Σ_{b∈S} D_b, the draw's own normaliser). Along each Δθ_S the E batch gives per-sequence influence values
T_Si of δH₁ + δH₂ (`second_order.taylor_rows`), F_S = mean_i T_Si. Over K draws:

    forecast   F̄ = mean_S F_S                                   the expected ΔH of the trainer's step
    σ_T²       = n/(n−1) · (N var_S(F_S) − mean_i var_S(T_Si)) / (N − 1)     its own draw's spread at B_T
    SE(F̄)²     = SE_E² + σ_T² (B_T/n + 1/K),   SE_E = std_i(mean_S T_Si) / √N

so ΔH_obs − F̄ has variance SE(F̄)² + σ_T² (+ the SE of ΔH_obs when it is sampled). Why each piece:
- σ_T is simulated at B_T itself: under clipping and Adam the spread does not scale as 1/B.
- var_S(F_S) also holds the E batch's noise (a noisy X̄ and Hessian projected on each Δθ_S). The rows are
  independent, so dropping each row's covariance with itself (the N var_S(F) − mean_i var_S(T_i) form, i.e.
  the mean over pairs i ≠ j of cov_S(T_i, T_j)) leaves the spread of the draws themselves; that noise is
  counted once, in SE_E.
- n/(n−1) removes the bootstrap's bias for a mean; B_T/n is the pool's own noise (a mean over size-B_T draws
  from a pool of n varies as σ_T² B_T/n), 1/K the finite number of draws.
The first-order forecast (T_Si from δH₁ alone) is summarised the same way beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import ProbeError
from .importance import standard_error
from .update_rule import UpdateRule

NO_GROUP_GRADIENTS = (
    "the forecast simulates the trainer's draw from the per-group U gradients, which were not kept",
    "raise compute.u_gradient_cache_mb (the cache holds B_U × trainable parameters) or lower trajectory.B_U",
)


def resample_groups(n_groups: int, size: int, n_draws: int, seed: int) -> Tensor:
    """[K, size] group indices: K draws of `size` groups from 0..n_groups−1 with replacement (fixed seed)."""
    if n_groups < 2 or size < 1 or n_draws < 2:
        raise ValueError(f"need ≥ 2 groups, size ≥ 1 and ≥ 2 draws (got {n_groups}, {size}, {n_draws})")
    return torch.randint(n_groups, (n_draws, size), generator=torch.Generator().manual_seed(seed))


def draw_gradient(g_groups: Tensor, denominators: Tensor, draw: Tensor) -> Tensor:
    """g_S = (Σ_{b∈S} g_b) · D / D_S (float64; a group drawn twice counts twice). 0 when D_S = 0."""
    counts = torch.bincount(draw, minlength=g_groups.shape[0]).to(denominators.dtype)
    share = float(counts @ denominators)
    scale = float(denominators.sum()) / share if share > 0 else 0.0
    return (counts.to(g_groups.dtype) @ g_groups).double() * scale


@dataclass
class TrainerDraws:
    """K simulated trainer steps: per-E-sequence influence values of their δH₁ and δH₂, Δθ̄, and checks."""

    first_rows: Tensor  # [K, N]: mean over i = δH₁ along Δθ_S
    second_rows: Tensor  # [K, N]: mean over i = δH₂ along Δθ_S
    mean_delta_theta: Tensor = field(repr=False)  # [P] Δθ̄ = mean_S Δθ_S
    norm: Tensor = field(repr=False)  # [K] ‖Δθ_S‖
    cos_reference: Tensor | None = field(default=None, repr=False)  # [K] cos(Δθ_S, reference)
    cos_next: Tensor | None = field(default=None, repr=False)  # [K−1] cos(Δθ_S, Δθ_S+1): two independent draws
    # the variance the shared difference's correction adds to the forecast (`simulate_trainer_draws_shared`)
    correction_var: float = 0.0

    @property
    def first_order(self) -> Tensor:
        """[K] δH₁ along each Δθ_S."""
        return self.first_rows.mean(1)

    @property
    def second_order(self) -> Tensor:
        """[K] δH₂ along each Δθ_S."""
        return self.second_rows.mean(1)


def _cos(a: Tensor, b: Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


def simulate_trainer_draws(
    update: UpdateRule,
    g_groups: Tensor,
    denominators: Tensor,
    draws: Tensor,
    taylor: Callable[[Tensor], tuple[Tensor, Tensor]],
    reference: Tensor | None = None,
) -> TrainerDraws:
    """Every draw S of `draws` [K, B_T] through `update` (`draw_gradient`, then the rule); `taylor(Δθ)` → the
    per-E-sequence influence values (δH₁ [N], δH₂ [N]) along Δθ; `reference` (e.g. Δθ_obs) the cosines of the
    emulation check. One Δθ_S is held at a time (P floats)."""
    first, second, norms, cos_ref, cos_next = [], [], [], [], []
    mean_delta, previous = None, None
    for draw in draws:
        delta = update.delta_theta(draw_gradient(g_groups, denominators, draw))
        rows1, rows2 = taylor(delta)
        first.append(rows1.double())
        second.append(rows2.double())
        mean_delta = delta.clone() if mean_delta is None else mean_delta + delta
        norms.append(float(delta.norm()))
        if reference is not None:
            cos_ref.append(_cos(delta, reference.double()))
        if previous is not None:
            cos_next.append(_cos(delta, previous))
        previous = delta
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return TrainerDraws(
        first_rows=torch.stack(first),
        second_rows=torch.stack(second),
        mean_delta_theta=mean_delta / len(draws),
        norm=as_t(norms),
        cos_reference=as_t(cos_ref) if reference is not None else None,
        cos_next=as_t(cos_next),
    )


def control_variate_second(d_rows: Tensor, exact: dict[int, Tensor]) -> Tensor:
    """[K, N] per-row δH₂ along every draw from one finite difference around the mean step (docs/math.md §11.4).

    d_rows[S, i] = Δθ̄ᵀ H_i Δθ_S (the derivative along Δθ_S of ψ_i shifted along Δθ̄). With Δθ_S = Δθ̄ + e_S,
    ½ Δθ_Sᵀ H_i Δθ_S = d_Si − ½ mean_S d_Si + ½ e_Sᵀ H_i e_S: the first two terms are kept for every draw, and
    the last — the draws' own curvature — is estimated per row as the mean residual over the draws in `exact`
    ({S: their δH₂ rows from their own finite difference}), which keep their exact values.
    """
    second = d_rows - 0.5 * d_rows.mean(0, keepdim=True)
    if exact:
        residual = torch.stack([exact[k] - second[k] for k in exact]).mean(0)
        second = second + residual
        for k, rows in exact.items():
            second[k] = rows
    return second


def simulate_trainer_draws_shared(
    update: UpdateRule,
    g_groups: Tensor,
    denominators: Tensor,
    draws: Tensor,
    shifted: Callable[[Tensor, list[Tensor]], tuple[Tensor, Tensor, float]],
    taylor: Callable[[Tensor], tuple[Tensor, Tensor]],
    exact_draws: int,
    reference: Tensor | None = None,
) -> TrainerDraws:
    """`simulate_trainer_draws` with one shared finite difference: `shifted(Δθ̄, [Δθ_S])` → ψ_i(±ε) [N, K] of
    every draw's direction at θ ± εΔθ̄, and ε (two stacked E backward passes for all K draws); δH₁ rows from
    their mean, δH₂ rows by `control_variate_second` with the first `exact_draws` draws (random, as all draws
    are) also through `taylor`. Holds the K steps Δθ_S at once (K × P floats)."""
    deltas = [update.delta_theta(draw_gradient(g_groups, denominators, draw)) for draw in draws]
    mean_delta = torch.stack(deltas).mean(0)
    plus, minus, eps = shifted(mean_delta, deltas)
    first = (0.5 * (plus + minus)).T.double()
    d_rows = ((plus - minus) / (2.0 * eps)).T.double()
    exact = {k: taylor(deltas[k])[1].double() for k in range(min(exact_draws, len(deltas)))}
    second = control_variate_second(d_rows, exact)
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return TrainerDraws(
        first_rows=first,
        second_rows=second,
        mean_delta_theta=mean_delta,
        norm=as_t([float(d.norm()) for d in deltas]),
        cos_reference=None if reference is None else as_t([_cos(d, reference.double()) for d in deltas]),
        cos_next=as_t([_cos(b, a) for a, b in zip(deltas, deltas[1:])]),
        correction_var=correction_variance(d_rows, exact),
    )


def correction_variance(d_rows: Tensor, exact: dict[int, Tensor]) -> float:
    """The variance of the correction in `control_variate_second` as part of the forecast F̄: the mean residual
    r_S = mean_i (exact − shared)_Si over n exact draws of K, var_S(r)/n · (1 − n/K) (a mean of n of K values)."""
    n, k = len(exact), d_rows.shape[0]
    if n < 2 or n >= k:
        return 0.0
    shared = d_rows - 0.5 * d_rows.mean(0, keepdim=True)
    residuals = torch.stack([(exact[s] - shared[s]).mean() for s in exact])
    return float(residuals.var(unbiased=True)) / n * (1.0 - n / k)


@dataclass(frozen=True)
class Forecast:
    """The trainer's next ΔH: F̄ ± SE (the probe's uncertainty) and σ_T (the trainer's own draw), with the
    first order alone beside it. `spread`: the SD of ΔH_obs − F̄ (without ΔH_obs's own SE)."""

    delta_h: float  # F̄ = mean_S (δH₁ + δH₂ along Δθ_S)
    delta_h1: float  # mean_S δH₁ along Δθ_S
    delta_h2: float  # mean_S δH₂ along Δθ_S
    se: float
    se_E: float
    sd_trainer: float  # σ_T
    se_first_order: float  # the same for the first order alone
    sd_trainer_first_order: float
    pool_groups: int  # n
    trainer_groups: int  # B_T
    n_draws: int  # K

    @property
    def spread(self) -> float:
        return math.sqrt(self.se**2 + self.sd_trainer**2)

    @property
    def spread_first_order(self) -> float:
        return math.sqrt(self.se_first_order**2 + self.sd_trainer_first_order**2)


def draw_spread(rows: Tensor) -> float:
    """The variance over draws S of the population value mean_i T_Si, without the E rows' own noise:
    the mean over row pairs i ≠ j of cov_S(T_Si, T_Sj) = (N var_S(m) − mean_i var_S(T_i)) / (N − 1), m = mean_i T
    (var with ddof 1; ≥ 0: a negative estimate — no spread beyond the rows' noise — is 0)."""
    n = rows.shape[1]
    total = float(rows.mean(1).var(unbiased=True))
    own = float(rows.var(dim=0, unbiased=True).mean())
    return max(0.0, (n * total - own) / (n - 1))


def summarise(draws: TrainerDraws, n_pool: int, trainer_groups: int) -> Forecast:
    """`Forecast` from K draws' influence values (module docstring)."""
    k = draws.first_rows.shape[0]
    share = trainer_groups / n_pool + 1.0 / k
    bias = n_pool / (n_pool - 1)

    def parts(rows: Tensor) -> tuple[float, float, float]:
        sd_t = math.sqrt(bias * draw_spread(rows))
        se_e = standard_error(rows.mean(0))
        return float(rows.mean()), sd_t, math.sqrt(se_e**2 + sd_t**2 * share)

    total = draws.first_rows + draws.second_rows
    value, sd_t, se = parts(total)
    se = math.sqrt(se**2 + draws.correction_var)
    value1, sd_t1, se1 = parts(draws.first_rows)
    return Forecast(
        delta_h=value,
        delta_h1=value1,
        delta_h2=float(draws.second_rows.mean()),
        se=se,
        se_E=standard_error(total.mean(0)),
        sd_trainer=sd_t,
        se_first_order=se1,
        sd_trainer_first_order=sd_t1,
        pool_groups=n_pool,
        trainer_groups=trainer_groups,
        n_draws=k,
    )


def check_pool(n_pool: int, trainer_groups: int, key: str) -> None:
    """The probe's pool must be larger than the trainer's batch (its own noise is then the smaller part)."""
    if trainer_groups < 1:
        raise ProbeError(f"the trainer's prompts per step is {trainer_groups}", "set trajectory.trainer_B_U ≥ 1")
    if n_pool <= trainer_groups:
        raise ProbeError(
            f"{key} = {n_pool} U prompt groups is not more than the trainer's {trainer_groups} per step: the "
            "probe's pool would be as noisy as the step it forecasts",
            f"raise {key} (4× the trainer's prompts per step is a good default)",
        )


__all__ = [
    "Forecast",
    "draw_spread",
    "NO_GROUP_GRADIENTS",
    "TrainerDraws",
    "check_pool",
    "draw_gradient",
    "resample_groups",
    "control_variate_second",
    "correction_variance",
    "simulate_trainer_draws",
    "simulate_trainer_draws_shared",
    "summarise",
]
