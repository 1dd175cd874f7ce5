"""Rao-Blackwellised entropy-gradient estimators (docs/math.md §3), as per-token coefficient tensors.

The E batch gives, per response token k of sequence i, the full-vocabulary entropy H_ik(θ) and the
sampled token's log-prob logp_ik(θ). Every estimator here is returned as two detached [N, R] tensors
a, c such that

    X_i = ∇_θ Σ_k ( a_ik · H_ik(θ) + c_ik · logp_ik(θ) ),     X̄ = Σ_i w_i X_i  (w = 1/N by default)

estimates ∇H for the chosen target. Along a direction v, with dH, dlogp the directional derivatives,
s_i = Σ_k a_ik dH_ik + c_ik dlogp_ik = X_i·v, and `EntropyCoefs.influence` turns them into the
per-sequence influence values ψ_i (mean(ψ) = X̄·v exactly; SE = std(ψ)/√N, delta method). Use ψ,
not s, for SE_E and attributions: for token_mean, std(s)/√N ignores the fluctuation of the plug-ins
Ĥ and L̄ and misstates the SE (by up to +35% on the tests' toy policy); ψ adds those terms. ψ also
carries the self-normalised importance-weight factor N·w_i.

Targets (`estimator.entropy`); S_i = Σ_k H_ik, L_i = Σ_k 1 (mask), causal sums R^S_ij = Σ_{k>j} H_ik,
R^L_ij = Σ_{k>j} 1 (H_k and "token k exists" depend only on y_<k, so k ≤ j drop out of the score at j):
- sequence             H = E[S]:      a = 1,  c_ij = R^S_ij − b_ij
- token_mean           H = E[S]/E[L]: quotient rule ∇H = (∇E[S] − H ∇E[L]) / E[L]:
                       a_i = 1/L̄₋ᵢ,  c_ij = (R^S_ij − Ĥ₋ᵢ R^L_ij − b_ij) / L̄₋ᵢ
- seq_mean_token_mean  H = E[f], f_i = S_i/L_i: 1/L_i depends on future tokens, so the score term
                       uses the whole f_i:  a_i = 1/L_i,  c_ij = f_i − b_ij

Leave-one-out plug-ins for token_mean: Ĥ₋ᵢ = Σ_{i'≠i} w S / Σ_{i'≠i} w L and L̄₋ᵢ = Σ_{i'≠i} w L / Σ_{i'≠i} w.
With the full-batch Ĥ, L̄ the coefficients of sequence i would depend on sequence i itself, and
E[Ĥ · score_i] ≠ E[Ĥ]·E[score_i]: an O(1/N) bias whose size is set by the (large) noise of the score
term. Leave-one-out removes that correlation; what remains is the O(1/N) ratio bias of the plug-ins,
which scales with the signal (∇E[L]·v, ∇H·v), not with the noise.

Baselines b_ij are detached and never use sequence i (so E[∇logp_ij · b_ij] = 0 exactly):
- none:        b = 0
- mean:        per-position leave-one-out mean of the return over the other sequences with position j
               (0 where no other sequence has it)
- regression:  ridge (intercept unpenalised) of the return on per-position features
               [H_ij, extra features (e.g. top1_prob, margin), log(1 + j), 1], cross-fitted: sequences are split
               into `folds` folds (i mod folds) and each fold is predicted from a fit on the others.
For token_mean the two causal sums are baselined separately, b = b^S − Ĥ₋ᵢ b^L, so that neither the
baseline nor Ĥ₋ᵢ sees sequence i. Baselines ignore importance weights (any function of the other
sequences keeps the score term mean-zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .errors import ProbeError
from .importance import standard_error

TARGETS = ("sequence", "token_mean", "seq_mean_token_mean")
BASELINES = ("none", "mean", "regression")


@dataclass
class EntropyCoefs:
    """Coefficients of X_i = ∇ Σ_k (a_ik H_ik + c_ik logp_ik), plus what the delta method needs.

    a, c: [N, R] detached, zero off the mask. entropy: plug-in estimate of H for the target.
    per_seq: [N] per-sequence quantity (S_i for sequence/token_mean, f_i = S_i/L_i for
    seq_mean_token_mean). weights: [N] normalised weights (sum 1) that form X̄ = Σ w_i X_i.
    lengths: [N] L_i. len_c: token_mean only, [N, R] score coefficients of the baselined length sums
    (R^L − b^L), so that Σ_i w_i Σ_j len_c_ij dlogp_ij estimates ∇E[L]·v. hhat, lbar: the full-batch
    weighted plug-ins Ĥ = Σ w S / Σ w L and L̄ = Σ w L.
    """

    a: Tensor
    c: Tensor
    entropy: float
    per_seq: Tensor
    target: str
    weights: Tensor
    lengths: Tensor
    len_c: Tensor | None = None
    hhat: float = float("nan")
    lbar: float = float("nan")

    def scalars(self, dH: Tensor | None, dlogp: Tensor) -> Tensor:
        """s_i = X_i·v = Σ_k a_ik dH_ik + c_ik dlogp_ik (dH may be None when a = 0). [N], float64."""
        s = (self.c.double() * dlogp.double()).sum(-1)
        if dH is not None:
            s = s + (self.a.double() * dH.double()).sum(-1)
        return s

    def influence(self, dH: Tensor | None, dlogp: Tensor) -> Tensor:
        """Per-sequence influence values ψ_i: mean(ψ) = X̄·v = Σ w_i s_i exactly, SE = std(ψ)/√N.

        ψ_i = T + N w_i [ (s_i − T) − κ_i ],  T = Σ w s, with the plug-in fluctuation term
        κ_i = (β/L̄²)(S_i − Ĥ L_i) + T (L_i − L̄)/L̄ for token_mean (β = Σ_i w_i Σ_j len_c_ij dlogp_ij
        ≈ ∇E[L]·v) and κ = 0 for the plain means. The N w_i factor is the self-normalised
        importance-sampling influence (1 for uniform weights). Σ w κ = 0, so the mean is unchanged.
        """
        w = self.weights.double()
        beta = None
        if self.target == "token_mean":
            beta = (w * (self.len_c.double() * dlogp.double()).sum(-1)).sum()
        return self.influence_from_rows(w * self.scalars(dH, dlogp), beta)

    def influence_from_rows(self, weighted_scalars: Tensor, beta: Tensor | float | None) -> Tensor:
        """`influence` from the per-row w_i s_i and (token_mean) β alone — what one ordinary backward with
        row hooks gives (`passes.entropy_rows`): ψ_i = T + N (w_i s_i − w_i T − w_i κ_i)."""
        w = self.weights.double()
        ws = weighted_scalars.double()
        total = ws.sum()
        dev = ws - w * total
        if self.target == "token_mean":
            if beta is None:
                raise ValueError("token_mean needs β = Σ_i w_i Σ_j len_c_ij dlogp_ij")
            lengths = self.lengths.double()
            kappa = beta / self.lbar**2 * (self.per_seq.double() - self.hhat * lengths)
            dev = dev - w * (kappa + total * (lengths - self.lbar) / self.lbar)
        return total + len(w) * dev

    def estimate(self, dH: Tensor | None, dlogp: Tensor) -> tuple[float, float]:
        """(X̄·v, SE) from the influence values."""
        psi = self.influence(dH, dlogp)
        return psi.mean().item(), standard_error(psi)


def _check_inputs(values: Tensor, mask: Tensor, target: str, what: str) -> Tensor:
    if target not in TARGETS:
        raise ProbeError(f"unknown entropy target '{target}'", f"use one of {', '.join(TARGETS)}")
    if values.ndim != 2 or mask.shape != values.shape:
        raise ValueError(f"{what} and mask must both be [N, R]; got {tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if not torch.isfinite(values[mask]).all():
        raise ProbeError(f"non-finite {what} in the E batch", "check the model dtype and the sampled artifacts")
    if (mask.sum(-1) == 0).any():
        raise ProbeError("an E sequence has an empty response", "regenerate the E batch (responses include eos)")
    return mask


def _normalised_weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)
    w = weights.detach().double()
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any() or abs(w.sum().item() - 1) > 1e-6:
        raise ValueError("weights must be a finite non-negative [N] tensor that sums to 1")
    return w


def _causal_sums(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(total_i, R_ij = Σ_{k>j} values_ik) over the mask, by one cumsum (no reversal needed)."""
    v = values * mask
    total = v.sum(-1)
    return total, (total[:, None] - v.cumsum(-1)) * mask


def _loo_position_mean(returns: Tensor, mask: Tensor) -> Tensor:
    """b_ij = mean of returns[i', j] over the sequences i' ≠ i that have position j (0 if none). [N,R,T]."""
    m = mask[..., None].to(returns.dtype)
    others = m.sum(0, keepdim=True) - m
    loo_sum = (returns * m).sum(0, keepdim=True) - returns * m
    return torch.where(others > 0, loo_sum / others.clamp(min=1), torch.zeros_like(returns)) * m


def _crossfit_ridge(features: Tensor, returns: Tensor, mask: Tensor, ridge: float, folds: int) -> Tensor:
    """Cross-fitted ridge predictions [N, R, T] of returns [N, R, T] from features [N, R, F].

    Sequence i is in fold i mod folds; fold k is predicted by β_k = argmin Σ_{rows ∉ k} |y − xβ|² + λ|β'|²
    (β' = all but the last, intercept, column). Each fold's normal equations are the full sufficient
    statistics minus the fold's own; the fits are solved together by one batched pseudo-inverse (robust
    to collinear features). A fold whose complement has no rows gets 0.
    """
    n, _, f = features.shape
    folds = max(1, min(folds, n))
    fold_of = (torch.arange(n, device=mask.device) % folds)[:, None].expand_as(mask)[mask]
    x, y = features[mask], returns[mask]  # [rows, F], [rows, T]
    members = [fold_of == k for k in range(folds)]  # loop over ≤ folds folds: memory stays O(rows·F)
    xtx_k = torch.stack([x[sel].T @ x[sel] for sel in members])
    xty_k = torch.stack([x[sel].T @ y[sel] for sel in members])
    penalty = torch.full((f,), float(ridge), dtype=x.dtype, device=x.device)
    penalty[-1] = 0.0
    beta = torch.linalg.pinv(xtx_k.sum(0) - xtx_k + torch.diag(penalty), hermitian=True) @ (xty_k.sum(0) - xty_k)
    pred_rows = torch.zeros_like(y)
    for k, sel in enumerate(members):
        if sel.sum() < len(x):  # the other folds have rows to fit on
            pred_rows[sel] = x[sel] @ beta[k]
    pred = torch.zeros_like(returns)
    pred[mask] = pred_rows
    return pred


def _feature_columns(features: Mapping[str, Tensor] | Tensor | None, mask: Tensor) -> Tensor:
    """Extra regressors as [N, R, F] float64: a mapping of [N, R] tensors (in sorted-key order), an
    [N, R] tensor or an [N, R, F] tensor; none → F = 0."""
    if features is None or (isinstance(features, Mapping) and not features):
        return torch.zeros(*mask.shape, 0, dtype=torch.float64, device=mask.device)
    if isinstance(features, Tensor):
        cols = features if features.ndim == 3 else features[..., None]
    else:
        cols = torch.stack([features[k] for k in sorted(features)], dim=-1)
    if cols.shape[:2] != mask.shape:
        raise ValueError(f"features must be [N, R] or [N, R, F] like the mask; got {tuple(cols.shape)}")
    return cols.detach().to(torch.float64) * mask[..., None]


def _baseline(
    returns: Tensor,
    mask: Tensor,
    entropies: Tensor,
    kind: str,
    features: Mapping[str, Tensor] | Tensor | None,
    ridge: float,
    folds: int,
) -> Tensor:
    """Detached baselines [N, R, T] for returns [N, R, T] that never use the sequence they apply to."""
    if kind == "none":
        return torch.zeros_like(returns)
    if kind == "mean":
        return _loo_position_mean(returns, mask)
    if kind == "regression":
        n, r = mask.shape
        # a fixed function of the position k: scaling by the artifact's longest response (which may be
        # sequence i's own) would let the ridge fit, and so i's baseline, depend on i's later tokens
        pos = torch.log1p(torch.arange(r, dtype=returns.dtype, device=returns.device)).expand(n, r)
        design = torch.cat([entropies[..., None], _feature_columns(features, mask), pos[..., None]], dim=-1)
        design = torch.cat([design, torch.ones_like(pos)[..., None]], dim=-1).to(returns.dtype)
        return _crossfit_ridge(design, returns, mask, ridge, folds)
    raise ProbeError(f"unknown baseline '{kind}'", f"use one of {', '.join(BASELINES)}")


def _loo_ratio_plugins(sums: Tensor, lengths: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Leave-one-out Ĥ₋ᵢ = Σ_{≠i} w S / Σ_{≠i} w L and L̄₋ᵢ = Σ_{≠i} w L / Σ_{≠i} w, each [N]."""
    if len(w) < 2:
        raise ProbeError("token_mean needs at least 2 E sequences", "raise batch_config.B_E")
    wl_rest = (w * lengths).sum() - w * lengths
    w_rest = 1.0 - w
    if (wl_rest <= 0).any() or (w_rest <= 0).any():
        raise ProbeError(
            "one E sequence carries all the importance weight", "sample E from a closer checkpoint or raise B_E"
        )
    return ((w * sums).sum() - w * sums) / wl_rest, wl_rest / w_rest


def entropy_coefficients(
    entropies: Tensor,
    mask: Tensor,
    *,
    target: str,
    baseline: str,
    features: Mapping[str, Tensor] | Tensor | None = None,
    ridge: float = 1.0,
    folds: int = 5,
    weights: Tensor | None = None,
) -> EntropyCoefs:
    """Rao-Blackwellised coefficients (a, c) of the entropy-gradient estimator for `target`.

    entropies: [N, R] per-position entropies (detached or not; they are detached here); mask: [N, R].
    features: optional extra per-position regressors for the regression baseline (e.g. top1_prob,
    margin): a mapping of [N, R] tensors (used in sorted-key order) or one [N, R, F] tensor; the
    regression always also uses H_ij, j/R and an intercept. weights: optional
    self-normalised importance weights [N] for the plug-ins (Ĥ, L̄, entropy); default uniform.
    """
    mask = _check_inputs(entropies, mask, target, "entropies")
    n = mask.shape[0]
    out_dtype = torch.promote_types(entropies.dtype, torch.float32)
    h = entropies.detach().double() * mask
    m = mask.double()
    w = _normalised_weights(weights, n, h)
    sums, rs = _causal_sums(h, mask)
    lengths, rl = _causal_sums(torch.ones_like(h), mask)

    def base(returns: Tensor) -> Tensor:
        return _baseline(returns, mask, h, baseline, features, ridge, folds)

    len_c = None
    hhat = lbar = float("nan")
    if target == "sequence":
        a = m
        c = (rs - base(rs[..., None])[..., 0]) * m
        per_seq, entropy = sums, (w * sums).sum().item()
    elif target == "token_mean":
        h_loo, l_loo = _loo_ratio_plugins(sums, lengths, w)
        b = base(torch.stack([rs, rl], dim=-1))
        len_c = (rl - b[..., 1]) * m
        c = ((rs - b[..., 0]) - h_loo[:, None] * len_c) / l_loo[:, None] * m
        a = m / l_loo[:, None]
        lbar = (w * lengths).sum().item()
        hhat = (w * sums).sum().item() / lbar
        per_seq, entropy = sums, hhat
    else:  # seq_mean_token_mean
        f = sums / lengths
        full = f[:, None] * m
        c = (full - base(full[..., None])[..., 0]) * m
        a = m / lengths[:, None]
        per_seq, entropy = f, (w * f).sum().item()
    return EntropyCoefs(
        a=a.to(out_dtype),
        c=c.to(out_dtype),
        entropy=entropy,
        per_seq=per_seq,
        target=target,
        weights=w,
        lengths=lengths,
        len_c=len_c,
        hhat=hhat,
        lbar=lbar,
    )


def naive_coefficients(logprobs: Tensor, mask: Tensor, *, target: str, weights: Tensor | None = None) -> EntropyCoefs:
    """The naive surprisal score-function estimator (comparison only): no RB, no baseline, a = 0.

    Entropy is estimated by the surprisal q_i = −Σ_k logp_ik of the sampled tokens (per token:
    q_i/L_i for seq_mean_token_mean, ratio of means for token_mean). X_i = ∇q_i + q_i ∇log π(y_i)
    with the whole-sequence score (no causal reward-to-go), written in c-form:
      sequence            c_ij = q_i − 1
      token_mean          c_ij = (q_i − 1 − Ĥ₋ᵢ L_i) / L̄₋ᵢ     (Ĥ₋ᵢ, L̄₋ᵢ: leave-one-out, as above)
      seq_mean_token_mean c_ij = (q_i − 1) / L_i
    The "−1" is the surprisal's own pathwise term (∇(−logp) = −∇logp). It is mean-zero for the first
    two targets but not for seq_mean_token_mean (E[∇log π(y)/L] = ∇E[1/L] ≠ 0), so it is kept.
    Caveat: for sequence and token_mean E[Σ_k −logp_k] = E[Σ_k H_k], so these are unbiased for ∇H.
    For seq_mean_token_mean they are not: y_k decides L, so E[(1/L) Σ_k −logp_k] ≠ E[(1/L) Σ_k H_k],
    and the naive estimator is unbiased for ∇E[−log π(y)/L] — a different functional.
    """
    mask = _check_inputs(logprobs, mask, target, "log-probs")
    n = mask.shape[0]
    out_dtype = torch.promote_types(logprobs.dtype, torch.float32)
    m = mask.double()
    w = _normalised_weights(weights, n, m)
    q = -(logprobs.detach().double() * m).sum(-1)
    lengths = m.sum(-1)
    len_c, hhat, lbar = None, float("nan"), float("nan")
    if target == "sequence":
        c, per_seq, entropy = (q - 1)[:, None] * m, q, (w * q).sum().item()
    elif target == "token_mean":
        h_loo, l_loo = _loo_ratio_plugins(q, lengths, w)
        len_c = lengths[:, None] * m
        c = ((q - 1 - h_loo * lengths) / l_loo)[:, None] * m
        lbar = (w * lengths).sum().item()
        hhat = (w * q).sum().item() / lbar
        per_seq, entropy = q, hhat
    else:
        f = q / lengths
        c, per_seq, entropy = ((q - 1) / lengths)[:, None] * m, f, (w * f).sum().item()
    return EntropyCoefs(
        a=torch.zeros_like(m).to(out_dtype),
        c=c.to(out_dtype),
        entropy=entropy,
        per_seq=per_seq,
        target=target,
        weights=w,
        lengths=lengths,
        len_c=len_c,
        hhat=hhat,
        lbar=lbar,
    )
