"""Ground-truth ΔH(η) = H(θ + m·Δθ) − H(θ), η = m·lr, on a grid of multipliers m (docs/math.md §8).

δH₁ = ∇H·Δθ predicts ΔH(η) ≈ m·δH₁ for small m. θ' = θ + m·Δθ is applied in place (Δθ from delta-h1's
bars, lr included), the entropy re-measured, and θ restored bit-exactly (`perturb.perturbed`; a checksum
over the touched parameters is compared before and after). ΔH is estimated two ways, for every target:

(a) self-normalised importance sampling over the E batch (§8.1). Per sequence, under φ (teacher forcing,
    `Batch.sequence_sums`): ℓ_i(φ), S_i(φ) = Σ_k H_ik(φ), L_i; with (a_i, b_i) = (S, 1) for `sequence`,
    (S, L) for `token_mean`, (S/L, 1) for `seq_mean_token_mean`:

        λ_i(φ) = ℓ_i(φ) − ℓ_i^behaviour,      H(φ) ≈ R(φ) = Σ ŵ_i a_i / Σ ŵ_i b_i   (`importance.ratio_estimate`)

    When θ drew E the behaviour log-prob is replaced by the teacher-forced ℓ_i(θ): λ(θ) ≡ 0 exactly and both
    terms of λ(θ') are scored by the same code path, so their rounding cancels (sampler and teacher-forcing
    log-probs differ by ~1e-6 in fp32, far more in bf16). ΔH = R(θ') − R(θ), SE from the paired influence
    values std(ψ(θ') − ψ(θ))/√N; ESS at θ' (and at θ). With top_p < 1, SNIS cannot see responses outside
    the behaviour policy's nucleus.

(b) fresh samples (§8.2): one response per E row under θ and under θ', same seed and batching — common
    random numbers, so most responses coincide and the paired difference has small variance. H from the
    sampler's own RB entropies (ŵ ≡ 1, same formulas); SE from the paired influence differences.

The model keeps the dtype it was loaded in (the one δH₁ was computed with).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .errors import ProbeError
from .estimators import TARGETS
from .generation import GenerationSpec, generate_responses
from .importance import effective_sample_size, paired_difference, ratio_estimate, standard_error
from .perturb import param_checksum, perturbed
from .scoring import Batch, SeqStats

log = logging.getLogger(__name__)

TRUTH_FIX = "use smaller truth.eta_multipliers or generation.top_p = 1"  # when every weight at θ' is 0


def target_parts(stats: SeqStats) -> dict[str, tuple[Tensor, Tensor]]:
    """(a_i, b_i) per target, so that H = E[w a] / E[w b]: (S, 1), (S, L), (S/L, 1)."""
    ones = torch.ones_like(stats.length)
    return {
        "sequence": (stats.entropy, ones),
        "token_mean": (stats.entropy, stats.length),
        "seq_mean_token_mean": (stats.entropy / stats.length, ones),
    }


def target_estimates(log_ratio: Tensor, stats: SeqStats) -> dict[str, tuple[float, Tensor]]:
    """Every target's SNIS estimate R and influence values ψ from log-weights and per-sequence sums."""
    return {t: ratio_estimate(log_ratio, a, b, TRUTH_FIX) for t, (a, b) in target_parts(stats).items()}


def quadratic_fit(multipliers: Sequence[float], values: Sequence[float]) -> tuple[float | None, float | None]:
    """Least squares ΔH(m) ≈ a·m + b·m² through the origin (ΔH(0) = 0): (slope a, curvature b).

    Two or more distinct non-zero m: both; exactly one: (ΔH/m, None); none: (None, None).
    """
    pts = [(float(m), float(v)) for m, v in zip(multipliers, values) if m != 0 and v is not None and math.isfinite(v)]
    distinct = {m for m, _ in pts}
    if not distinct:
        return None, None
    if len(distinct) == 1:
        m, v = pts[0]
        return v / m, None
    m = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    coef = torch.linalg.lstsq(torch.stack([m, m * m], dim=1), y[:, None]).solution[:, 0]
    return float(coef[0]), float(coef[1])


@dataclass
class FreshSampling:
    """What (b) needs: the E rows' prompt texts (row order) and the draw (the E samples' π settings, CRN seed)."""

    tokenizer: object
    prompts: list[str]
    spec: GenerationSpec

    def draw(self, model) -> dict[str, Tensor]:
        """One response per prompt under the model's current θ (`generation.generate_responses`)."""
        return generate_responses(model, self.tokenizer, self.prompts, self.spec, progress=False)


def check_same_prompts(fresh: dict[str, Tensor], E: Batch) -> None:
    """The fresh responses answer the very prompts (as tokens) of the E rows, row by row."""
    F = Batch.from_tensors(fresh, E.temperature, E.top_p, E.input_ids.device, E.logits_chunk_mb)
    a, b = F.prompt_tokens(), E.prompt_tokens()
    same_lens = torch.equal(F.tensors["prompt_lens"], E.tensors["prompt_lens"])
    if a.shape != b.shape or not torch.equal(a, b) or not same_lens:
        raise ProbeError(
            "the prompts re-tokenised for fresh samples differ from the E samples' prompt tokens",
            "rerun sample-e with the current dataset and tokenizer, or set truth.fresh_samples=false",
        )


def model_checksum(model, names: Sequence[str]) -> str:
    """`perturb.param_checksum` of the named parameters (the ones a perturbation touches)."""
    params = dict(model.named_parameters())
    return param_checksum({n: params[n] for n in names})


@dataclass
class PerturbedPasses:
    """E teacher-forced (and, with fresh sampling, a fresh CRN draw) at θ and at θ + m·Δθ for each multiplier m.

    moved: [(m, E's sums at θ + m·Δθ, the fresh draw's there or None)]; max_abs_logp_diff: E's recorded log-probs
    against teacher forcing at θ; checksum: of the touched parameters, the same before and after."""

    base: SeqStats
    fresh_base: SeqStats | None
    moved: list[tuple[float, SeqStats, SeqStats | None]]
    max_abs_logp_diff: float
    checksum: str
    timings: dict[str, float]


def perturbed_passes(
    model, E: Batch, delta_theta: dict[str, Tensor], multipliers: Sequence[float], fresh, max_tokens: int, what: str
) -> PerturbedPasses:
    """The passes ground truth and the sampled ΔH_obs share: θ + m·Δθ applied in place per multiplier and restored
    bit-exactly (`perturb.perturbed`, also when a pass fails; a checksum over the touched parameters guards the
    whole run). Raises ValueError for a model in training mode or fresh samples drawn with other π settings than E,
    ProbeError when the fresh prompts are not E's rows' prompts, RuntimeError if θ was not restored."""
    if model.training:
        raise ValueError(f"{what} needs the model in eval mode (dropout off)")
    if fresh and (fresh.spec.temperature, fresh.spec.top_p) != (E.temperature, E.top_p):
        raise ValueError("fresh samples must be drawn with the E samples' temperature and top_p")
    names = list(delta_theta)
    checksum = model_checksum(model, names)
    timings = {"teacher_forcing": 0.0, "fresh_sampling": 0.0}

    def tf_pass(desc: str) -> tuple[SeqStats, float]:
        start = time.perf_counter()
        out = E.sequence_sums(model, max_tokens, desc)
        timings["teacher_forcing"] += time.perf_counter() - start
        return out

    def fresh_pass() -> SeqStats | None:
        if not fresh:
            return None
        start = time.perf_counter()
        tensors = fresh.draw(model)
        check_same_prompts(tensors, E)  # row i of the draw answers E row i's prompt: one unit per row
        timings["fresh_sampling"] += time.perf_counter() - start
        return SeqStats.of_samples(tensors)

    base, max_diff = tf_pass(f"{what} θ")
    fresh_base = fresh_pass()
    moved = []
    for m in multipliers:
        with perturbed(model, delta_theta, float(m)):
            new, _ = tf_pass(f"{what} θ + {m:g}·Δθ")
            moved.append((float(m), new, fresh_pass()))
    if model_checksum(model, names) != checksum:  # perturbed() restores by copy_ and checks too
        raise RuntimeError(f"{what}: the parameters were not restored exactly")
    return PerturbedPasses(base, fresh_base, moved, max_diff, checksum, timings)


def estimate_truth(
    model,
    E: Batch,
    delta_theta: dict[str, Tensor],
    multipliers: Sequence[float],
    *,
    max_tokens: int,
    behaviour_is_model: bool,
    fresh: FreshSampling | None = None,
) -> dict:
    """ΔH(m·lr) for every multiplier m and every target, by SNIS over E and (with `fresh`) fresh samples.

    `behaviour_is_model`: the model's current θ drew E (then w(θ) ≡ 1; else E's behaviour log-probs define
    the weights). Returns {"n_sequences", "entropy": {"snis": {t: H(θ)}, "fresh": {t: H(θ)} | None},
    "entropy_se" (alike), "ess_theta", "max_abs_logp_diff", "etas": [{"multiplier", "ess", "snis": {t:
    {delta_h, se}}, "fresh": … | None}], "checksum", "restored_exactly"}. θ is restored bit-exactly even
    when a pass fails (`perturbed_passes`).
    """
    passes = perturbed_passes(model, E, delta_theta, multipliers, fresh, max_tokens, "truth")
    base = passes.base
    behaviour = base.logprob if behaviour_is_model else E.tensors["logprobs"].double().sum(-1)
    logw0 = base.logprob - behaviour  # ≡ 0 when θ drew the samples
    snis0 = target_estimates(logw0, base)
    zeros = torch.zeros(len(E), dtype=torch.float64)
    fresh0 = None if passes.fresh_base is None else target_estimates(zeros, passes.fresh_base)
    etas = []
    for m, new, fresh_new in passes.moved:
        etas.append(_eta_entry(m, new.logprob - behaviour, new, snis0, fresh_new, fresh0))
        _log_eta(etas[-1], len(E))
    log.info("truth: phase seconds %s", {k: round(v, 4) for k, v in passes.timings.items()})
    values = {"snis": snis0, "fresh": fresh0}
    return {
        "n_sequences": len(E),
        "entropy": {k: None if v is None else {t: h for t, (h, _) in v.items()} for k, v in values.items()},
        "entropy_se": {
            k: None if v is None else {t: standard_error(psi) for t, (_, psi) in v.items()} for k, v in values.items()
        },
        "ess_theta": effective_sample_size(logw0, TRUTH_FIX),
        "max_abs_logp_diff": passes.max_abs_logp_diff,
        "etas": etas,
        "checksum": passes.checksum,
        "restored_exactly": True,  # perturbed_passes raises otherwise
    }


def _eta_entry(m: float, logw: Tensor, new: SeqStats, snis0: dict, fresh_new: SeqStats | None, fresh0) -> dict:
    """ΔH at one multiplier: SNIS (weights exp(logw) of E under θ') and, with fresh samples, their estimate,
    each paired with its value at θ."""
    snis_new = target_estimates(logw, new)
    entry = {
        "multiplier": m,
        "ess": effective_sample_size(logw, TRUTH_FIX),
        "snis": {t: paired_difference(snis_new[t], snis0[t]) for t in TARGETS},
        "fresh": None,
    }
    if fresh_new is not None:
        est = target_estimates(torch.zeros(len(fresh_new.length), dtype=torch.float64), fresh_new)
        entry["fresh"] = {t: paired_difference(est[t], fresh0[t]) for t in TARGETS}
    return entry


def _finite(x: float) -> float | None:
    """A standard error for JSON: None where it is undefined (NaN: one sequence)."""
    return None if not math.isfinite(x) else x


def _ratio(x: float | None, pred: float) -> float | None:
    return None if x is None or pred == 0 or not math.isfinite(pred) else x / pred


def compare_with_prediction(result: dict, target: str, lr: float, delta_h1: float, estimates: dict) -> dict:
    """truth.json's `etas`, `linearity` and `targets` (docs/math.md §8.3) from `estimate_truth`'s result.

    target, lr, delta_h1: delta-h1's configured target, learning rate and δH₁ (the prediction at η = m·lr is
    m·δH₁); estimates: delta-h1's {target: {delta_h1, se_E}} (objects with those attributes); a target
    delta-h1 did not estimate (not compute.all_targets) gets null delta_h1 and se_E.
    """
    n, fresh = result["n_sequences"], result["entropy"]["fresh"] is not None
    etas = []
    for e in result["etas"]:
        m, pred = e["multiplier"], e["multiplier"] * delta_h1
        snis, fr = e["snis"][target], e["fresh"][target] if fresh else None
        etas.append(
            {
                "multiplier": m,
                "eta": m * lr,
                "delta_h1_pred": pred,
                "snis": {
                    "delta_h": snis["delta_h"],
                    "se": _finite(snis["se"]),
                    "ess": e["ess"],
                    "ess_fraction": e["ess"] / n,
                },
                "fresh": None if fr is None else {"delta_h": fr["delta_h"], "se": _finite(fr["se"])},
                "ratio_snis": _ratio(snis["delta_h"], pred),
                "ratio_fresh": None if fr is None else _ratio(fr["delta_h"], pred),
            }
        )
    ms = [e["multiplier"] for e in etas]
    slope_s, curv_s = quadratic_fit(ms, [e["snis"]["delta_h"] for e in etas])
    slope_f, curv_f = quadratic_fit(ms, [e["fresh"]["delta_h"] for e in etas]) if fresh else (None, None)

    def per_eta(kind: str, key: str, t: str) -> list | None:
        return None if result["entropy"][kind] is None else [e[kind][t][key] for e in result["etas"]]

    targets = {
        t: {
            "delta_h1": estimates[t].delta_h1 if t in estimates else None,
            "se_E": estimates[t].se_E if t in estimates else None,
            "entropy_snis": result["entropy"]["snis"][t],
            "entropy_snis_se": _finite(result["entropy_se"]["snis"][t]),
            "entropy_fresh": result["entropy"]["fresh"][t] if fresh else None,
            "entropy_fresh_se": _finite(result["entropy_se"]["fresh"][t]) if fresh else None,
            "delta_h_snis": per_eta("snis", "delta_h", t),
            "se_snis": [_finite(x) for x in per_eta("snis", "se", t)],
            "delta_h_fresh": per_eta("fresh", "delta_h", t),
            "se_fresh": [_finite(x) for x in per_eta("fresh", "se", t)] if fresh else None,
        }
        for t in TARGETS
    }
    linearity = {
        "delta_h1": delta_h1,
        "slope_snis": slope_s,
        "curvature_snis": curv_s,
        "slope_fresh": slope_f,
        "curvature_fresh": curv_f,
    }
    return {"etas": etas, "linearity": linearity, "targets": targets}


def _log_eta(entry: dict, n: int) -> None:
    def estimates(kind: str) -> str:
        return ", ".join(f"{t} {entry[kind][t]['delta_h']:+.3e}±{entry[kind][t]['se']:.1e}" for t in TARGETS)

    fresh = "" if entry["fresh"] is None else "; fresh " + estimates("fresh")
    log.info("truth η = %g·lr: SNIS %s (ESS %.1f/%d)%s", entry["multiplier"], estimates("snis"), entry["ess"], n, fresh)


# ----------------------------------------------------------------------------------------------
# the truth stage's report


def fresh_sampling(samples, prompt_set, tokenizer, batch_size: int, seed: int) -> FreshSampling:
    """(b)'s draw: the E rows' prompts from the dataset they were drawn from, E's π settings, the given seed."""
    recorded = samples.meta.dataset.fingerprint
    if recorded != prompt_set.fingerprint:
        raise ProbeError(
            f"the E samples were drawn from dataset {recorded}, batch_config names {prompt_set.fingerprint}",
            "point batch_config at the E samples' dataset, or set truth.fresh_samples=false",
        )
    index = samples.prompt_index
    if bool(((index < 0) | (index >= len(prompt_set))).any()):
        raise ProbeError("E prompt_index lies outside the dataset", "rerun sample-e")
    gen = samples.meta.generation
    spec = GenerationSpec(gen.temperature, gen.top_p, gen.max_new_tokens, batch_size, seed, gen.stop)
    return FreshSampling(tokenizer, [prompt_set.prompts[i] for i in index.tolist()], spec)


def check_multipliers(values: Sequence[float]) -> list[float]:
    """truth.eta_multipliers as floats, refused when empty or not finite."""
    ms = [float(m) for m in values]
    if not ms or not all(math.isfinite(m) for m in ms):
        raise ProbeError(
            f"truth.eta_multipliers = {list(values)} is empty or not finite", "give finite numbers, e.g. [0.5, 1, 2]"
        )
    return ms


def truth_report(model, E: Batch, samples, report, bars, fingerprint: str, fresh, multipliers, max_tokens, min_ess):
    """truth.json for delta-h1's `report` and `bars` (Δθ) on the E `samples` (on the device as `E`), the
    probed policy `model` (fingerprint `fingerprint`): SNIS, and fresh samples when `fresh` is given."""
    from .artifacts.truth import TruthReport

    bars.check_fits(model)
    sampler = samples.meta.checkpoint_fingerprint
    same = sampler == fingerprint
    gen, target, lr = samples.meta.generation, report.target, report.learning_rate
    log.info(
        "truth: %d E sequences drawn by %s (%s), target %s, lr %.4g, T=%g, top_p=%g; m in %s; fresh samples %s",
        len(E),
        sampler,
        "this checkpoint" if same else f"not this one, {fingerprint}",
        target,
        lr,
        gen.temperature,
        gen.top_p,
        multipliers,
        "on" if fresh else "off",
    )
    if gen.top_p < 1:
        log.warning("truth: top_p=%g < 1 — SNIS cannot see responses outside the behaviour policy's nucleus", gen.top_p)
    result = estimate_truth(
        model, E, bars.delta_theta, multipliers, max_tokens=max_tokens, behaviour_is_model=same, fresh=fresh
    )
    _warn(result, same, min_ess)
    return TruthReport(
        target=target,
        learning_rate=lr,
        delta_h1=report.delta_h1,
        se_delta_h1=report.se_delta_h1,
        **compare_with_prediction(result, target, lr, report.delta_h1, report.targets),
        n_sequences=result["n_sequences"],
        restored_exactly=result["restored_exactly"],
        checkpoint_fingerprint=fingerprint,
        sampler_fingerprint=sampler,
        same_checkpoint=same,
        ess_theta=result["ess_theta"],
        max_abs_logp_diff=result["max_abs_logp_diff"],
        param_checksum=result["checksum"],
        generation={
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "max_new_tokens": gen.max_new_tokens,
            "stop": gen.stop,
        },
        fresh_seed=fresh.spec.seed if fresh else None,
    )


def _warn(result: dict, same: bool, floor: float) -> None:
    """Diagnostics that make a result less trustworthy: log-prob mismatch, low ESS."""
    n = result["n_sequences"]
    if same and result["max_abs_logp_diff"] > 1e-2:
        log.warning(
            "truth: the E log-probs differ from teacher forcing by up to %.2g although this checkpoint drew them",
            result["max_abs_logp_diff"],
        )
    if result["ess_theta"] < floor * n:
        log.warning(
            "truth: ESS of the E samples at θ is %.1f of %d (< reuse.min_ess_fraction = %g): SNIS is unreliable",
            result["ess_theta"],
            n,
            floor,
        )
    for e in result["etas"]:
        if e["ess"] < floor * n:
            log.warning(
                "truth: at η = %g·lr the SNIS ESS is %.1f of %d (< reuse.min_ess_fraction = %g): trust (b) there",
                e["multiplier"],
                e["ess"],
                n,
                floor,
            )


__all__ = [
    "check_multipliers",
    "check_same_prompts",
    "fresh_sampling",
    "truth_report",
    "FreshSampling",
    "compare_with_prediction",
    "TRUTH_FIX",
    "estimate_truth",
    "model_checksum",
    "quadratic_fit",
    "target_estimates",
    "target_parts",
]
