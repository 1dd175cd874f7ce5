"""The second-order term δH₂ = ½ Δθᵀ∇²H Δθ from the E samples, with its SE (docs/math.md §5.6).

Along the line θ(s) = θ + sΔθ, with D(s) = ∇H(θ(s))·Δθ (the directional derivative, so D(0) = δH₁ and
D'(0) = Δθᵀ∇²HΔθ):

    H(θ + sΔθ) ≈ H(θ) + s·δH₁ + s²·δH₂,        δH₂ = ½ D'(0) ≈ ¼ (D(ε) − D(−ε)) / ε

Each D(±ε) is the ordinary δH₁ estimator run at θ ± εΔθ on the samples drawn at θ: the samples are
re-scored there (entropies and features for the coefficients, log-probs for the weights) and
self-normalised importance weights w_i(±ε) ∝ π_{θ±εΔθ}(y_i) / π_θ(y_i) make them a sample of the
shifted policy. The same sequences serve both points, so the SE comes from the per-sequence paired
differences ¼ (ψ_i(ε) − ψ_i(−ε)) / ε of the influence values, in which most sampling noise cancels.

The linear regime: with δH(s) ≈ s δH₁ + s² δH₂, the quadratic term is a fraction f of the linear one at
s* = f |δH₁| / |δH₂|, i.e. at the learning rate η* = s* · lr (`linear_regime`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field, fields

import torch

from . import distributed
from .errors import ProbeError
from .estimators import EntropyCoefs, entropy_coefficients
from .importance import importance_weights, standard_error
from .passes import as_direction, entropy_pass, entropy_rows, influence_along
from .perturb import perturbed
from .scoring import Batch
from .sharded import local_tensor
from .specs import SecondOrderSpec
from .tangents import RowDirectional
from .update import FlatLayout

log = logging.getLogger(__name__)

VERDICTS = ("linear", "curved", "unresolved")


@dataclass
class SecondOrder:
    """δH₂ ± SE, the δH₁ of the same samples, and where the first-order prediction stops being trustworthy."""

    delta_h2: float  # ½ Δθᵀ∇²HΔθ, estimated by ¼ (D(ε) − D(−ε)) / ε
    se_delta_h2: float  # std of the paired per-sequence differences / √N
    delta_h1: float  # X̄·Δθ at θ from the same samples (the configured target)
    delta_h1_plus_h2: float  # second-order prediction of ΔH for the whole step (s = 1)
    eta_star: float | None  # s* · lr; None when δH₂ is not resolved from 0
    step_multiplier_star: float | None  # s* = fraction · |δH₁| / |δH₂|; None when δH₂ is not resolved
    fraction: float  # f: the tolerated |quadratic| / |linear| ratio that defines s*
    verdict: str  # linear | curved | unresolved (see `linear_regime`)
    fd_eps: float  # ε: the finite-difference step, as a multiple of Δθ
    ess_fraction_plus: float  # ESS/N of the weights at θ + εΔθ
    ess_fraction_minus: float  # ESS/N of the weights at θ − εΔθ
    influence: torch.Tensor | None = field(default=None, repr=False)  # [N] ¼ (ψ_i(ε) − ψ_i(−ε)) / ε: mean = δH₂

    def numbers(self) -> dict:
        """Every field but the per-sequence influence (what delta_h1.json records)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}


@dataclass
class Regime:
    """`linear_regime`'s answer: s*, η* = s*·lr (None when δH₂ is not resolved) and the verdict."""

    step_multiplier_star: float | None
    eta_star: float | None
    verdict: str


def linear_regime(delta_h1: float, delta_h2: float, se_delta_h2: float, lr: float, fraction: float, z: float) -> Regime:
    """s* = f |δH₁| / |δH₂| (where |s² δH₂| = f |s δH₁|), η* = s* · lr, and a verdict for this step (s = 1).

    δH₂ counts as resolved when |δH₂| > z · SE. Then verdict = "linear" if s* ≥ 1 (at this lr the quadratic
    term is at most f of the linear one), else "curved". When it is not resolved s* and η* are None (the
    point estimate would give an arbitrarily large η*), and the verdict uses the largest |δH₂| the data
    allow, |δH₂| + z · SE: "linear" if even that gives s* ≥ 1, else "unresolved".
    """
    values = (delta_h1, delta_h2, se_delta_h2, lr, fraction, z)
    if not all(math.isfinite(v) for v in values) or se_delta_h2 < 0 or lr <= 0 or fraction <= 0 or z <= 0:
        raise ValueError(f"linear_regime: bad inputs {values}")
    if abs(delta_h2) > z * se_delta_h2:
        s_star = fraction * abs(delta_h1) / abs(delta_h2)
        return Regime(s_star, s_star * lr, "linear" if s_star >= 1 else "curved")
    largest = abs(delta_h2) + z * se_delta_h2
    s_lower = fraction * abs(delta_h1) / largest if largest > 0 else 0.0
    return Regime(None, None, "linear" if s_lower >= 1 else "unresolved")


@dataclass
class ShiftedEstimate:
    """The δH₁ estimator run at θ + sΔθ on the samples drawn at θ: D(s) = mean ψ, ψ [N], ESS/N of its weights."""

    value: float
    influence: torch.Tensor
    ess_fraction: float


# refuse when the applied shift θ(s) − θ differs from sΔθ by more than this (relative, in norm): the parameters'
# dtype cannot represent so small a change (bf16, or a tiny ε·Δθ/θ). Measured on the tests' toy model (N = 512):
# rounding 0.09 left the float32 δH₂ within 0.03 SE of the float64 one, 0.33 moved it by 0.5 SE (docs/math.md §5.6)
MAX_SHIFT_ROUNDING = 0.1
# warn below this ESS/N at θ ± εΔθ: the shift moves the policy enough that the finite difference may be biased
MIN_SHIFT_ESS_FRACTION = 0.99


def _coefficients(stats: dict, E: Batch, estimator, weights: torch.Tensor) -> EntropyCoefs:
    """The configured target's coefficients from per-token statistics re-scored at the shifted θ."""
    dtype = stats["entropies"].dtype
    features = torch.stack([stats["top1_prob"], stats["margin"]], dim=-1).to(dtype)
    return entropy_coefficients(
        stats["entropies"],
        E.mask,
        target=estimator.entropy,
        baseline=estimator.baseline,
        features=features,
        ridge=estimator.ridge,
        folds=estimator.crossfit_folds,
        weights=weights.to(dtype),
    )


@torch.no_grad()
def shift_rounding(params: list[torch.Tensor], shift: dict[str, torch.Tensor], names: list[str], s: float) -> float:
    """‖(θ + sΔθ in the parameters' dtype) − θ − sΔθ‖ / ‖sΔθ‖: how much of the shift the dtype loses.

    The same arithmetic as `perturb.perturbed` (Δθ cast to the parameter's dtype, then added with alpha = s),
    one parameter at a time so that no second copy of θ is held.
    """
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device)  # (lost, wanted), read once at the end
    for name, p in zip(names, params):
        d, p = shift[name].to(p.device), local_tensor(p.detach())
        applied = p.add(d.to(p.dtype), alpha=s).double() - p.double()
        sums += torch.stack([(applied - s * d.double()).pow(2).sum(), (s * d.double()).pow(2).sum()])
    if any(hasattr(p, "to_local") for p in params):  # FSDP: this process's shards; the norms are over all
        distributed.all_reduce_sum(sums)
    lost, wanted = sums.tolist()
    return math.sqrt(lost / wanted) if wanted > 0 else 0.0


def shifted_estimates(
    model,
    E: Batch,
    layout: FlatLayout,
    delta_theta: torch.Tensor,
    estimator,
    max_tokens: int,
    steps,
    e_weights=None,
    pass_at_zero: bool = True,
    along: list[torch.Tensor] | None = None,
) -> dict[float, ShiftedEstimate]:
    """D(s) = ∇H(θ + sΔθ)·Δθ for every s in `steps` (0 among them), from the samples drawn at θ.
    pass_at_zero=False: s = 0 is only re-scored (the weights' reference) and left out of the result.
    along: K flat directions v_k to take the derivative along instead of Δθ (θ still shifted along Δθ):
    ψ_i(s) is then [N, K], ∇H_i(θ + sΔθ)·v_k, from one stacked E backward per s (`passes.influence_along`).

    At each s (the model shifted in place, restored bit-exactly): re-score E without gradient, weights
    w_i(s) ∝ e_w,i · exp(ℓ_i(s) − ℓ_i(0)) (ℓ_i = Σ_k log π(y_ik), teacher-forced at both points, so they
    carry the same rounding and w(0) = e_w exactly), the target's coefficients from the entropies and
    features at s, and one E pass along Δθ for the influence values ψ_i(s) (row hooks, or per-token
    tangents when a module using a trainable tensor has no hook rule). E is not modified.
    """
    steps = sorted(set(steps), key=abs)
    if steps[0] != 0.0:
        raise ValueError("shifted_estimates needs s = 0 among the steps (the reference of the weights)")
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    direction = as_direction(delta_theta, layout, params)
    shift = layout.unflatten(delta_theta.double())
    for s in steps[1:]:
        lost = shift_rounding(params, shift, layout.names, s)
        if lost > MAX_SHIFT_ROUNDING:
            raise ProbeError(
                f"the {params[0].dtype} parameters cannot represent the finite-difference shift {s:g}·Δθ "
                f"({lost:.0%} of it is lost to rounding)",
                "raise second_order.fd_eps, or load the trainable weights in float32 (checkpoint.dtype: fp32)",
            )
    # log of the weights E already carries (−inf for a weight of 0): the shift weights multiply them
    base_log_weight = torch.zeros(len(E), dtype=torch.float64, device=E.mask.device)
    if e_weights is not None:
        base_log_weight = e_weights.detach().double().to(E.mask.device).log()
    out: dict[float, ShiftedEstimate] = {}
    logp_at_theta = None
    hooks_work = RowDirectional.supports(model, layout.names)
    for s in steps:  # s = 0 first: its log-probs are the reference of the shift weights
        with perturbed(model, shift, s) if s else contextlib.nullcontext():
            stats = E.token_stats(model, max_tokens, desc=f"re-score at θ{s:+g}Δθ")
            logp = stats["logprobs"].double().sum(-1)  # 0 off the response mask
            logp_at_theta = logp if logp_at_theta is None else logp_at_theta
            shift_log_ratio = logp - logp_at_theta
            # a row E's weights already exclude keeps weight 0 (its ℓ at θ may be −inf: −inf − −inf is NaN)
            shift_log_ratio = torch.where(base_log_weight.isneginf(), 0.0, shift_log_ratio)
            if s == 0 and not pass_at_zero:
                continue
            weights, ess = importance_weights(base_log_weight + shift_log_ratio, "lower second_order.fd_eps")
            coefs = _coefficients(stats, E, estimator, weights)
            if along is not None:
                psi = influence_along(model, E, layout, coefs, along, max_tokens)
            elif hooks_work:  # one ordinary backward with row hooks (docs/math.md §6.2)
                _, ws, beta = entropy_rows(model, params, layout.names, E, coefs, direction, max_tokens)
                psi = coefs.influence_from_rows(ws, beta)
            else:  # per-token tangents by double backward (§6.1)
                _, dH, dlogp = entropy_pass(model, params, layout, E, coefs, direction, max_tokens)
                psi = coefs.influence(dH, dlogp)
        out[s] = ShiftedEstimate(float(psi.mean()), psi, ess / len(E))
    return out


def _check_inputs(E: Batch, layout: FlatLayout, delta_theta, lr, fd_eps, fraction, e_weights) -> None:
    if delta_theta.shape != (layout.numel,) or not bool(torch.isfinite(delta_theta).all()):
        raise ProbeError(
            f"Δθ for the second-order term must be a finite vector of {layout.numel} entries "
            f"(got shape {tuple(delta_theta.shape)})",
            "pass the flat Δθ that delta-h1 computed for this checkpoint",
        )
    for name, value in (("lr", lr), ("second_order.fd_eps", fd_eps), ("second_order.fraction", fraction)):
        if not (math.isfinite(value) and value > 0):
            raise ProbeError(f"{name} = {value} for the second-order term", f"set {name} to a number > 0")
    if len(E) < 2:
        raise ProbeError("the second-order term needs at least 2 E sequences for its SE", "raise batch_config.B_E")
    if e_weights is not None and e_weights.shape != (len(E),):
        raise ProbeError(
            f"E weights have shape {tuple(e_weights.shape)} for {len(E)} E sequences",
            "pass the importance weights of these E samples",
        )


def taylor_rows(
    model,
    E: Batch,
    layout: FlatLayout,
    delta_theta: torch.Tensor,
    estimator,
    fd_eps: float,
    max_tokens: int,
    e_weights=None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Per-E-sequence influence values of δH₁ and δH₂ along Δθ from D(±ε) (`shifted_estimates`):

        first_i = ½ (ψ_i(ε) + ψ_i(−ε)),      second_i = ¼ (ψ_i(ε) − ψ_i(−ε)) / ε

    (means: δH₁ + O(ε²) and δH₂), and the ESS/N of the weights at θ ± εΔθ."""
    steps = (0.0, fd_eps, -fd_eps)
    points = shifted_estimates(model, E, layout, delta_theta, estimator, max_tokens, steps, e_weights, False)
    plus, minus = points[fd_eps], points[-fd_eps]
    first = 0.5 * (plus.influence + minus.influence)
    second = (plus.influence - minus.influence) / (4.0 * fd_eps)
    return first, second, (plus.ess_fraction, minus.ess_fraction)


def second_order(
    model,
    E: Batch,
    layout: FlatLayout,
    delta_theta: torch.Tensor,
    estimator,
    spec: SecondOrderSpec,
    *,
    lr: float,
    max_tokens: int = 4096,
    e_weights: torch.Tensor | None = None,
) -> SecondOrder:
    """δH₂ = ½ Δθᵀ∇²HΔθ ≈ ¼ (D(ε) − D(−ε)) / ε for the target `estimator.entropy`, from the E samples.

    delta_theta: flat Δθ (float64, layout order). e_weights: self-normalised importance weights of E when
    another checkpoint drew it (None: θ drew it); they multiply the shift weights π_{θ±εΔθ}/π_θ.
    SE = std(¼ (ψ_i(ε) − ψ_i(−ε)) / ε) / √N. δH₁ = ½ (D(ε) + D(−ε)) = D(0) + O(ε²) (the caller usually has
    D(0) already: no pass at s = 0). Cost: two E passes (s = ±ε) and three no-grad re-scorings (s = 0, ±ε).
    spec: ε (fd_eps), the fraction f of the linear regime and z_resolve (|δH₂| > z_resolve · SE counts as
    resolved, `linear_regime`).
    """
    fd_eps, fraction = spec.fd_eps, spec.fraction
    _check_inputs(E, layout, delta_theta, lr, fd_eps, fraction, e_weights)
    first, paired, (ess_plus, ess_minus) = taylor_rows(
        model, E, layout, delta_theta, estimator, fd_eps, max_tokens, e_weights
    )
    delta_h2, se = float(paired.mean()), standard_error(paired)
    delta_h1 = float(first.mean())
    regime = linear_regime(delta_h1, delta_h2, se, lr, fraction, spec.z_resolve)
    for sign, ess in (("+", ess_plus), ("−", ess_minus)):
        if ess < MIN_SHIFT_ESS_FRACTION:
            log.warning(
                "second order: ESS/N = %.3f at θ %s εΔθ: the shift moves the policy a lot, so the finite "
                "difference may be biased; lower second_order.fd_eps",
                ess,
                sign,
            )
    return SecondOrder(
        delta_h2=delta_h2,
        se_delta_h2=se,
        delta_h1=delta_h1,
        delta_h1_plus_h2=delta_h1 + delta_h2,
        eta_star=regime.eta_star,
        step_multiplier_star=regime.step_multiplier_star,
        fraction=fraction,
        verdict=regime.verdict,
        fd_eps=fd_eps,
        ess_fraction_plus=ess_plus,
        ess_fraction_minus=ess_minus,
        influence=paired,
    )


__all__ = [
    "Regime",
    "SecondOrder",
    "ShiftedEstimate",
    "VERDICTS",
    "linear_regime",
    "second_order",
    "shift_rounding",
    "shifted_estimates",
    "taylor_rows",
]
