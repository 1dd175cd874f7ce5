"""The `truth` stage: ground-truth ΔH(η) = H(θ + (η/lr)·Δθ) − H(θ) on a grid of step sizes (SPEC §3).

δH₁ = ∇H·Δθ predicts ΔH(η) ≈ (η/lr)·δH₁ for small η. This stage applies θ' = θ + m·Δθ
(η = m·lr, Δθ from delta-h1's bars.safetensors, which already includes lr) in place, re-measures the entropy, and
restores θ bit-exactly (`exact.perturbed`; a checksum over the touched parameters is compared before
and after). ΔH is estimated two ways, for every entropy target:

(a) self-normalised importance sampling (SNIS) over the E artifact. With per-sequence sums
    S_i(φ) = Σ_k H_k(φ; y_i,<k) (RB entropies, full vocabulary), L_i = response length,
    ℓ_i(φ) = Σ_k log π_φ(y_ik | y_i,<k) (teacher forcing, no grad) and the behaviour log-prob ℓ_i^b
    stored in the artifact:

        w_i(φ) ∝ exp(ℓ_i(φ) − ℓ_i^b),        H(φ) ≈ Σ_i w_i a_i(φ) / Σ_i w_i b_i

    with (a, b) = (S, 1) for `sequence`, (S, L) for `token_mean` (a ratio of weighted means) and
    (S/L, 1) for `seq_mean_token_mean`. When θ drew the samples (same checkpoint fingerprint), the
    behaviour log-prob is replaced by the teacher-forced ℓ_i(θ): w(θ) ≡ 1 exactly and
    w(θ') = π_θ'(y)/π_θ(y) with both terms scored by the same code path, so their rounding cancels
    (sampler and teacher-forcing log-probs differ by ~1e-6 in fp32, far more in bf16).
    SE by the delta method on paired influence values: the ratio estimate R = Σ w a / Σ w b has
    ψ_i = w_i (a_i − R b_i) / mean(w b), and ΔH = R(θ') − R(θ) has ψ_i(θ') − ψ_i(θ), SE = std/√N.
    ESS = (Σ w)² / Σ w² (reported for θ', and for θ when another checkpoint drew E).
    Caveat: with top_p < 1, SNIS cannot see responses outside the behaviour policy's nucleus.

(b) fresh samples (`truth.fresh_samples`): one response per E prompt under θ and under θ', same
    seed (`truth.seed`) and batching — common random numbers, so most responses coincide and the
    paired difference has small variance. H from the sampler's own RB entropies (w ≡ 1, same
    formulas); SE from the paired per-sequence influence differences.

The model keeps the dtype it was loaded in (the one δH₁ was computed with). Output: truth.json with,
per η, the prediction m·δH₁, both estimates with SE (and ESS), their ratios to the prediction, and a
least-squares fit ΔH(m) = a·m + b·m² (slope a vs δH₁, curvature b).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .files import read_json, read_tensors, write_json
from .outputs import staged_output_dir
from .errors import ProbeError
from .estimators import TARGETS, importance_weights
from .exact import param_checksum, perturbed
from .params import Params
from .policy import teacher_force, token_budget_slices

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# estimators (pure tensors)


@dataclass
class SeqStats:
    """Per-sequence sums under one parameter setting, float64 [N]: ℓ_i = Σ_k log π(y_ik), S_i = Σ_k H_ik, L_i."""

    logprob: Tensor
    entropy: Tensor
    length: Tensor


def target_parts(stats: SeqStats) -> dict[str, tuple[Tensor, Tensor]]:
    """(a_i, b_i) per target, so that H = E[w a] / E[w b]: (S, 1), (S, L), (S/L, 1)."""
    ones = torch.ones_like(stats.length)
    return {
        "sequence": (stats.entropy, ones),
        "token_mean": (stats.entropy, stats.length),
        "seq_mean_token_mean": (stats.entropy / stats.length, ones),
    }


def _weights(logw: Tensor) -> Tensor:
    """exp(logw − max logw): unnormalised SNIS weights (every ratio below is scale-free)."""
    if not torch.isfinite(logw).any():
        raise ProbeError(
            "every importance weight is 0 (no E response is possible under the perturbed policy)",
            "use smaller truth.eta_multipliers or generation.top_p = 1",
        )
    return (logw - logw.max()).exp()


def ratio_estimate(logw: Tensor, a: Tensor, b: Tensor) -> tuple[float, Tensor]:
    """R = Σ w a / Σ w b and its influence values ψ_i = w_i (a_i − R b_i) / mean(w b).

    mean(ψ) = 0 and SE(R) = std(ψ)/√N (delta method for a ratio of means).
    """
    w = _weights(logw.double())
    a, b = a.double(), b.double()
    wb = w * b
    value = (w * a).sum() / wb.sum()
    return float(value), w * (a - value * b) / wb.mean()


def effective_sample_size(logw: Tensor) -> float:
    """ESS = (Σ w)² / Σ w²  (N for equal weights); see `estimators.importance_weights`."""
    return importance_weights(logw)[1]


def target_estimates(logw: Tensor, stats: SeqStats) -> dict[str, tuple[float, Tensor]]:
    """Every target's SNIS estimate and influence values from log-weights and per-sequence sums."""
    return {t: ratio_estimate(logw, a, b) for t, (a, b) in target_parts(stats).items()}


def _se(psi: Tensor) -> float:
    """std(ψ)/√N: the delta-method standard error from influence values."""
    return float(psi.std() / math.sqrt(len(psi))) if len(psi) > 1 else float("nan")


def paired_difference(new: tuple[float, Tensor], old: tuple[float, Tensor]) -> dict[str, float]:
    """ΔH = R_new − R_old with SE = std(ψ_new − ψ_old)/√N (the two estimates share their sequences)."""
    return {"delta_h": new[0] - old[0], "se": _se(new[1] - old[1])}


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


# ----------------------------------------------------------------------------------------------
# passes over the model


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def teacher_forced_stats(
    model, samples: dict[str, Tensor], temperature: float, top_p: float, max_tokens: int, desc: str = "teacher forcing"
) -> tuple[SeqStats, float]:
    """Per-sequence sums of the E responses under the model's current θ, and max |log π − behaviour log-prob|.

    One forward per token-budget microbatch (`policy.token_budget_slices`), no graph.
    """
    from .sampling import response_mask

    ids, attn = samples["input_ids"], samples["attention_mask"]
    behaviour = samples["logprobs"]
    n, n_cols = ids.shape
    n_prompt_cols = n_cols - behaviour.shape[1]
    mask = response_mask(samples)
    device = _device(model)
    logprob = torch.zeros(n, dtype=torch.float64)
    entropy = torch.zeros(n, dtype=torch.float64)
    max_diff = 0.0
    for rows in tqdm(token_budget_slices(n, n_cols, max_tokens), desc=desc, leave=False, disable=None):
        m = mask[rows].to(device)
        st = teacher_force(
            model, ids[rows].to(device), attn[rows].to(device), n_prompt_cols, m, temperature, top_p, with_grad=False
        )
        if not torch.isfinite(st.entropies).all():
            raise ProbeError(
                "the model produced non-finite entropies on the E samples", "check the checkpoint for NaN weights"
            )
        logprob[rows] = st.logprobs.double().sum(-1).cpu()
        entropy[rows] = st.entropies.double().sum(-1).cpu()
        diff = (st.logprobs.float() - behaviour[rows].to(device)).abs()[m]
        diff = diff[torch.isfinite(diff)]
        if diff.numel():
            max_diff = max(max_diff, float(diff.max()))
    return SeqStats(logprob, entropy, samples["response_lens"].double()), max_diff


def sampled_stats(tensors: dict[str, Tensor]) -> SeqStats:
    """Per-sequence sums of a `generate_responses` result (the sampler's own log-probs and RB entropies)."""
    return SeqStats(
        logprob=tensors["logprobs"].double().sum(-1),
        entropy=tensors["entropies"].double().sum(-1),
        length=tensors["response_lens"].double(),
    )


@dataclass
class FreshSampling:
    """What (b) needs: the E rows' prompt texts (row order), generation settings, and the CRN seed."""

    tokenizer: object
    prompts: list[str]
    max_new_tokens: int
    batch_size: int
    seed: int
    stop: str | None = None


def _fresh_samples(model, spec: FreshSampling, temperature: float, top_p: float) -> dict[str, Tensor]:
    from .sampling import generate_responses

    return generate_responses(
        model, spec.tokenizer, spec.prompts, temperature=temperature, top_p=top_p,
        max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, seed=spec.seed, stop=spec.stop,
        progress=False,
    )  # fmt: skip


def _check_same_prompts(fresh: dict[str, Tensor], samples: dict[str, Tensor]) -> None:
    """The fresh responses answer the very prompts (as tokens) of the E rows, row by row."""

    def prompt_block(t: dict[str, Tensor]) -> Tensor:
        P = t["input_ids"].shape[1] - t["logprobs"].shape[1]
        return t["input_ids"][:, :P] * t["attention_mask"][:, :P]

    a, b = prompt_block(fresh), prompt_block(samples)
    if a.shape != b.shape or not torch.equal(a, b) or not torch.equal(fresh["prompt_lens"], samples["prompt_lens"]):
        raise ProbeError(
            "the prompts re-tokenised for fresh samples differ from the E samples' prompt tokens",
            "rerun sample-e with the current dataset and tokenizer, or set truth.fresh_samples=false",
        )


def model_checksum(model, names: Sequence[str]) -> str:
    """`exact.param_checksum` of the named parameters (the ones a perturbation touches)."""
    params = dict(model.named_parameters())
    return param_checksum({n: params[n] for n in names})


def _check_delta(model, delta_theta: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, d in delta_theta.items():
        if name not in params:
            raise ProbeError(
                f"Δθ names parameter '{name}', which the model lacks", "rerun delta-h1 for this checkpoint"
            )
        if tuple(d.shape) != tuple(params[name].shape):
            raise ProbeError(
                f"Δθ for '{name}' has shape {tuple(d.shape)}, the parameter {tuple(params[name].shape)}",
                "rerun delta-h1 for this checkpoint",
            )
        if not torch.isfinite(d).all():
            raise ProbeError(f"Δθ for '{name}' has non-finite entries", "rerun delta-h1")


def estimate_truth(
    model,
    samples: dict[str, Tensor],
    delta_theta: dict[str, Tensor],
    multipliers: Sequence[float],
    *,
    temperature: float,
    top_p: float,
    max_tokens: int,
    behaviour_is_model: bool,
    fresh: FreshSampling | None = None,
) -> dict:
    """ΔH(m·lr) for every multiplier m and every target, by SNIS over `samples` and (with `fresh`) fresh samples.

    `behaviour_is_model`: the model's current θ drew `samples` (then w(θ) ≡ 1; else the stored
    behaviour log-probs define the weights). Returns
    {"n_sequences", "entropy": {"snis": {t: H(θ)}, "fresh": {t: H(θ)} | None}, "entropy_se" (alike), "ess_theta",
     "max_abs_logp_diff", "etas": [{"multiplier", "ess", "snis": {t: {delta_h, se}}, "fresh": … | None}],
     "checksum", "restored_exactly", "timings"}. θ is restored bit-exactly even when a pass fails.
    """
    if model.training:
        raise ValueError("estimate_truth needs the model in eval mode (dropout off)")
    _check_delta(model, delta_theta)
    names = list(delta_theta)
    checksum = model_checksum(model, names)
    timings = {"teacher_forcing": 0.0, "fresh_sampling": 0.0}

    def tf_pass(desc: str) -> tuple[SeqStats, float]:
        start = time.perf_counter()
        out = teacher_forced_stats(model, samples, temperature, top_p, max_tokens, desc)
        timings["teacher_forcing"] += time.perf_counter() - start
        return out

    def fresh_pass() -> SeqStats:
        start = time.perf_counter()
        tensors = _fresh_samples(model, fresh, temperature, top_p)
        _check_same_prompts(tensors, samples)
        timings["fresh_sampling"] += time.perf_counter() - start
        return sampled_stats(tensors)

    base, max_diff = tf_pass("truth θ")
    behaviour = base.logprob if behaviour_is_model else samples["logprobs"].double().sum(-1)
    logw0 = base.logprob - behaviour  # ≡ 0 when θ drew the samples
    snis0 = target_estimates(logw0, base)
    fresh0 = target_estimates(torch.zeros(len(base.length), dtype=torch.float64), fresh_pass()) if fresh else None
    n = len(base.length)

    etas = []
    for m in multipliers:
        with perturbed(model, delta_theta, float(m)):
            new, _ = tf_pass(f"truth {m:g}·lr")
            fresh_new = fresh_pass() if fresh else None
        logw = new.logprob - behaviour
        snis_new = target_estimates(logw, new)
        entry = {
            "multiplier": float(m),
            "ess": effective_sample_size(logw),
            "snis": {t: paired_difference(snis_new[t], snis0[t]) for t in TARGETS},
            "fresh": None,
        }
        if fresh:
            zeros = torch.zeros(len(fresh_new.length), dtype=torch.float64)
            est = target_estimates(zeros, fresh_new)
            entry["fresh"] = {t: paired_difference(est[t], fresh0[t]) for t in TARGETS}
        etas.append(entry)
        log.info(
            "truth η = %g·lr: SNIS %s (ESS %.1f/%d)%s", m,
            ", ".join(f"{t} {entry['snis'][t]['delta_h']:+.3e}±{entry['snis'][t]['se']:.1e}" for t in TARGETS),
            entry["ess"], n,
            "" if not fresh else "; fresh " + ", ".join(
                f"{t} {entry['fresh'][t]['delta_h']:+.3e}±{entry['fresh'][t]['se']:.1e}" for t in TARGETS
            ),
        )  # fmt: skip

    after = model_checksum(model, names)
    if after != checksum:  # perturbed() restores by copy_ and checks too; this guards the whole run
        raise RuntimeError("truth: the parameters were not restored exactly")
    return {
        "n_sequences": n,
        "entropy": {
            "snis": {t: v for t, (v, _) in snis0.items()},
            "fresh": None if fresh0 is None else {t: v for t, (v, _) in fresh0.items()},
        },
        "entropy_se": {
            "snis": {t: _se(psi) for t, (_, psi) in snis0.items()},
            "fresh": None if fresh0 is None else {t: _se(psi) for t, (_, psi) in fresh0.items()},
        },
        "ess_theta": effective_sample_size(logw0),
        "max_abs_logp_diff": max_diff,
        "etas": etas,
        "checksum": checksum,
        "restored_exactly": after == checksum,
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }


# ----------------------------------------------------------------------------------------------
# the stage


def _generation(meta: dict) -> tuple[float, float, int, str | None]:
    gen = meta.get("generation") or {}
    try:
        return float(gen["temperature"]), float(gen.get("top_p", 1.0)), int(gen["max_new_tokens"]), gen.get("stop")
    except (KeyError, TypeError, ValueError):
        raise ProbeError("samples.json lacks generation.temperature / max_new_tokens", "rerun sample-e") from None


def _multipliers(values: Sequence[float]) -> list[float]:
    ms = [float(m) for m in values]
    if not ms or not all(math.isfinite(m) for m in ms):
        raise ProbeError(
            f"truth.eta_multipliers = {list(values)} is empty or not finite", "give finite numbers, e.g. [0.5, 1, 2]"
        )
    return ms


def _ratio(x: float | None, pred: float) -> float | None:
    return None if x is None or pred == 0 or not math.isfinite(pred) else x / pred


def _finite(x):
    """JSON has no NaN/inf: write null instead."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _read_delta(params: Params) -> tuple[dict[str, Tensor], dict, float, str]:
    """(Δθ by parameter name, the delta-h1 report, lr, configured target)."""
    dh1_dir = Path(params.paths.delta_h1)
    report = read_json(dh1_dir / "delta_h1.json", "delta-h1 report")
    lr = report.get("learning_rate")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ProbeError(f"delta_h1.json has learning_rate {lr!r}, need a positive number", "rerun delta-h1")
    for key in ("delta_h1", "se_delta_h1"):
        if not isinstance(report.get(key), (int, float)):
            raise ProbeError(f"delta_h1.json lacks a numeric '{key}'", "rerun delta-h1")
    bars, _ = read_tensors(dh1_dir / "bars.safetensors", "bars")
    delta = {k[len("delta_theta.") :]: v for k, v in bars.items() if k.startswith("delta_theta.")}
    if not delta:
        raise ProbeError("bars.safetensors holds no delta_theta.* tensors", "rerun delta-h1")
    target = (report.get("estimator") or {}).get("entropy") or params.estimator.entropy
    if target not in TARGETS:
        raise ProbeError(f"delta_h1.json names an unknown entropy target '{target}'", "rerun delta-h1")
    return delta, report, float(lr), target


def _print_plan(params: Params, samples: dict, meta: dict, out_dir) -> None:
    ms = _multipliers(params.truth.eta_multipliers)
    n, n_cols = samples["input_ids"].shape
    n_mb = len(token_budget_slices(n, n_cols, params.compute.max_tokens_per_microbatch))
    report_path = Path(params.paths.delta_h1) / "delta_h1.json"
    lr = read_json(report_path, "delta-h1 report").get("learning_rate") if report_path.exists() else None
    etas = ", ".join(f"{m:g}" + ("" if lr is None else f" ({m * lr:.3g})") for m in ms)
    fresh = (
        f"fresh samples: {len(ms) + 1} generate passes of {n} sequences (θ and each θ'; seed {params.truth.seed}, "
        f"batches of <= {params.generation.gen_batch_size})"
        if params.truth.fresh_samples
        else "fresh samples: off"
    )
    print(
        f"truth plan: η = m·lr for m in [{etas}]{'' if lr is not None else ' (lr from delta-h1, not computed yet)'}; "
        f"{n} E sequences (drawn by {meta.get('checkpoint_fingerprint')}); "
        f"SNIS: {len(ms) + 1} teacher-forcing passes of {n_mb} microbatches each; {fresh}; output {out_dir}"
    )


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> dict | None:
    """Ground-truth ΔH(η) on the truth.eta_multipliers grid; writes `out_dir/truth.json`."""
    from .sampling import load_samples

    t0 = time.perf_counter()
    samples, meta = load_samples(params.paths.sample_e, "samples_e")  # meta: provenance incl. generation
    if dry_run:
        _print_plan(params, samples, meta, out_dir)
        return None
    multipliers = _multipliers(params.truth.eta_multipliers)
    temperature, top_p, max_new, stop = _generation(meta)
    delta, report, lr, target = _read_delta(params)

    from .checkpoint import checkpoint_fingerprint, load_policy_model, load_tokenizer, resolve_paths

    paths = resolve_paths(params.checkpoint)
    fingerprint = checkpoint_fingerprint(paths)
    probed = report.get("checkpoint_fingerprint")
    if probed is not None and probed != fingerprint:
        raise ProbeError(
            f"delta_h1.json is for checkpoint {probed}, but checkpoint.path {params.checkpoint.path} is {fingerprint}",
            "rerun delta-h1 for this checkpoint (dvc repro), or point paths.delta_h1 at its output",
        )
    sampler = meta.get("checkpoint_fingerprint")
    same = sampler == fingerprint
    fresh = None
    if params.truth.fresh_samples:
        from .task import load_prompts

        prompt_set = load_prompts(params.batch_config)
        recorded = (meta.get("dataset") or {}).get("fingerprint")
        if recorded is not None and recorded != prompt_set.fingerprint:
            raise ProbeError(
                f"the E samples were drawn from dataset {recorded}, batch_config names {prompt_set.fingerprint}",
                "point batch_config at the E samples' dataset, or set truth.fresh_samples=false",
            )
        index = samples["prompt_index"]
        if bool(((index < 0) | (index >= len(prompt_set))).any()):
            raise ProbeError("E prompt_index lies outside the dataset", "rerun sample-e")
        fresh = FreshSampling(
            tokenizer=load_tokenizer(paths),
            prompts=[prompt_set.prompts[i] for i in index.tolist()],
            max_new_tokens=max_new,
            batch_size=params.generation.gen_batch_size,
            seed=params.truth.seed,
            stop=stop,
        )
    model = load_policy_model(params.checkpoint, paths).eval()
    log.info(
        "truth: %d E sequences drawn by %s (%s), target %s, lr %.4g, T=%g, top_p=%g; m in %s; fresh samples %s",
        len(samples["input_ids"]), sampler, "this checkpoint" if same else f"not this one, {fingerprint}",
        target, lr, temperature, top_p, multipliers, "on" if fresh else "off",
    )  # fmt: skip
    if top_p < 1:
        log.warning("truth: top_p=%g < 1 — SNIS cannot see responses outside the behaviour policy's nucleus", top_p)

    result = estimate_truth(
        model, samples, delta, multipliers, temperature=temperature, top_p=top_p,
        max_tokens=params.compute.max_tokens_per_microbatch, behaviour_is_model=same, fresh=fresh,
    )  # fmt: skip
    n = result["n_sequences"]
    if same and result["max_abs_logp_diff"] > 1e-2:
        log.warning(
            "truth: the E log-probs differ from teacher forcing by up to %.2g although this checkpoint drew them",
            result["max_abs_logp_diff"],
        )
    floor = params.reuse.min_ess_fraction
    if result["ess_theta"] < floor * n:
        log.warning("truth: ESS of the E samples at θ is %.1f of %d (< reuse.min_ess_fraction = %g): "
                    "SNIS is unreliable", result["ess_theta"], n, floor)  # fmt: skip
    for e in result["etas"]:
        if e["ess"] < floor * n:
            log.warning("truth: at η = %g·lr the SNIS ESS is %.1f of %d (< reuse.min_ess_fraction = %g): "
                        "trust (b) there", e["multiplier"], e["ess"], n, floor)  # fmt: skip

    dh1, se_dh1 = float(report["delta_h1"]), float(report["se_delta_h1"])
    per_target = report.get("targets") or {}
    etas = []
    for e in result["etas"]:
        m, pred = e["multiplier"], e["multiplier"] * dh1
        snis, fr = e["snis"][target], e["fresh"][target] if e["fresh"] else None
        etas.append({
            "multiplier": m,
            "eta": m * lr,
            "delta_h1_pred": pred,
            "snis": {"delta_h": snis["delta_h"], "se": _finite(snis["se"]),
                     "ess": e["ess"], "ess_fraction": e["ess"] / n},
            "fresh": None if fr is None else {"delta_h": fr["delta_h"], "se": _finite(fr["se"])},
            "ratio_snis": _ratio(snis["delta_h"], pred),
            "ratio_fresh": None if fr is None else _ratio(fr["delta_h"], pred),
        })  # fmt: skip
    ms = [e["multiplier"] for e in etas]
    slope_s, curv_s = quadratic_fit(ms, [e["snis"]["delta_h"] for e in etas])
    slope_f, curv_f = quadratic_fit(ms, [e["fresh"]["delta_h"] for e in etas]) if fresh else (None, None)
    targets = {}
    for t in TARGETS:
        est = per_target.get(t) or {}
        targets[t] = {
            "delta_h1": est.get("delta_h1"),
            "se_E": est.get("se_E"),
            "entropy_snis": result["entropy"]["snis"][t],
            "entropy_snis_se": _finite(result["entropy_se"]["snis"][t]),
            "entropy_fresh": None if not fresh else result["entropy"]["fresh"][t],
            "entropy_fresh_se": None if not fresh else _finite(result["entropy_se"]["fresh"][t]),
            "delta_h_snis": [e["snis"][t]["delta_h"] for e in result["etas"]],
            "se_snis": [_finite(e["snis"][t]["se"]) for e in result["etas"]],
            "delta_h_fresh": None if not fresh else [e["fresh"][t]["delta_h"] for e in result["etas"]],
            "se_fresh": None if not fresh else [_finite(e["fresh"][t]["se"]) for e in result["etas"]],
        }
    out = {
        "target": target,
        "learning_rate": lr,
        "delta_h1": dh1,
        "se_delta_h1": se_dh1,
        "etas": etas,
        "linearity": {
            "delta_h1": dh1,
            "slope_snis": slope_s,
            "curvature_snis": curv_s,
            "slope_fresh": slope_f,
            "curvature_fresh": curv_f,
        },
        "targets": targets,
        "n_sequences": n,
        "restored_exactly": result["restored_exactly"],
        # provenance and diagnostics
        "checkpoint_fingerprint": fingerprint,
        "sampler_fingerprint": sampler,
        "same_checkpoint": same,
        "ess_theta": result["ess_theta"],
        "max_abs_logp_diff": result["max_abs_logp_diff"],
        "param_checksum": result["checksum"],
        "generation": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new, "stop": stop},
        "fresh_seed": params.truth.seed if fresh else None,
        "timings": result["timings"],
    }
    with staged_output_dir(out_dir) as tmp:
        write_json(tmp / "truth.json", out)
    for e in etas:
        fr = "" if e["fresh"] is None else f", fresh {e['fresh']['delta_h']:+.3e} ± {e['fresh']['se'] or 0:.1e}"
        ratio = "n/a" if e["ratio_snis"] is None else f"{e['ratio_snis']:.3f}"
        log.info(
            "%s η = %g·lr: δH₁ pred %+.3e; SNIS %+.3e ± %.1e (ratio %s, ESS/N %.3f)%s",
            target, e["multiplier"], e["delta_h1_pred"], e["snis"]["delta_h"], e["snis"]["se"] or 0,
            ratio, e["snis"]["ess_fraction"], fr,
        )  # fmt: skip
    log.info("truth: wrote %s in %.1f s", Path(out_dir) / "truth.json", time.perf_counter() - t0)
    return out


__all__ = [
    "FreshSampling",
    "SeqStats",
    "effective_sample_size",
    "estimate_truth",
    "paired_difference",
    "model_checksum",
    "quadratic_fit",
    "ratio_estimate",
    "run",
    "sampled_stats",
    "target_estimates",
    "target_parts",
    "teacher_forced_stats",
]
