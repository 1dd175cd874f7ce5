"""The `truth` stage: ground-truth ΔH(η) on the truth.eta_multipliers grid (docs/math.md §8).

Reads the E samples, delta-h1's report and Δθ (bars); loads the checkpoint delta-h1 probed; estimates ΔH(η)
by SNIS over E and, with truth.fresh_samples, by fresh samples (`ground_truth.estimate_truth`); writes
truth.json (`TruthReport`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from entropy_probe.artifacts.delta_h1 import Bars, DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.truth import TruthReport
from entropy_probe.errors import ProbeError
from entropy_probe.generation import GenerationSpec
from entropy_probe.ground_truth import FreshSampling, compare_with_prediction, estimate_truth
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.policy import token_budget_slices
from entropy_probe.scoring import Batch

log = logging.getLogger(__name__)


def _multipliers(values: Sequence[float]) -> list[float]:
    ms = [float(m) for m in values]
    if not ms or not all(math.isfinite(m) for m in ms):
        raise ProbeError(
            f"truth.eta_multipliers = {list(values)} is empty or not finite", "give finite numbers, e.g. [0.5, 1, 2]"
        )
    return ms


def _print_plan(params: Params, samples: Samples, out_dir) -> None:
    ms = _multipliers(params.truth.eta_multipliers)
    n, n_cols = samples.input_ids.shape
    n_mb = len(token_budget_slices(n, n_cols, params.compute.max_tokens_per_microbatch))
    dh1_dir = params.paths.delta_h1
    lr = DeltaH1Report.read(dh1_dir).learning_rate if DeltaH1Report.path(dh1_dir).exists() else None
    etas = ", ".join(f"{m:g}" + ("" if lr is None else f" ({m * lr:.3g})") for m in ms)
    fresh = (
        f"fresh samples: {len(ms) + 1} generate passes of {n} sequences (θ and each θ'; seed {params.truth.seed}, "
        f"batches of <= {params.generation.gen_batch_size})"
        if params.truth.fresh_samples
        else "fresh samples: off"
    )
    print(
        f"truth plan: η = m·lr for m in [{etas}]{'' if lr is not None else ' (lr from delta-h1, not computed yet)'}; "
        f"{n} E sequences (drawn by {samples.meta.checkpoint_fingerprint}); "
        f"SNIS: {len(ms) + 1} teacher-forcing passes of {n_mb} microbatches each; {fresh}; output {out_dir}"
    )


def _fresh_sampling(params: Params, samples: Samples, tokenizer) -> FreshSampling:
    """(b)'s draw: the E rows' prompts from the dataset they were drawn from, E's π settings, truth.seed."""
    from entropy_probe.task import load_prompts

    prompt_set = load_prompts(params.batch_config)
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
    spec = GenerationSpec(
        gen.temperature, gen.top_p, gen.max_new_tokens, params.generation.gen_batch_size, params.truth.seed, gen.stop
    )
    return FreshSampling(tokenizer, [prompt_set.prompts[i] for i in index.tolist()], spec)


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Ground-truth ΔH(η) on the truth.eta_multipliers grid; writes `out_dir/truth.json`."""
    from entropy_probe.checkpoint import checkpoint_fingerprint, load_policy_model, load_tokenizer, resolve_paths

    samples = Samples.read(params.paths.sample_e, "samples_e")
    if dry_run:
        _print_plan(params, samples, out_dir)
        return None
    multipliers = _multipliers(params.truth.eta_multipliers)
    report, bars = DeltaH1Report.read(params.paths.delta_h1), Bars.read(params.paths.delta_h1)
    paths = resolve_paths(params.checkpoint)
    fingerprint = checkpoint_fingerprint(paths)
    report.check_checkpoint(
        fingerprint,
        f"checkpoint.path {params.checkpoint.path} is",
        "rerun delta-h1 for this checkpoint (dvc repro), or point paths.delta_h1 at its output",
    )
    sampler = samples.meta.checkpoint_fingerprint
    same = sampler == fingerprint
    fresh = _fresh_sampling(params, samples, load_tokenizer(paths)) if params.truth.fresh_samples else None
    model = load_policy_model(params.checkpoint, paths).eval()
    bars.check_fits(model)
    gen, target, lr = samples.meta.generation, report.target, report.learning_rate
    log.info(
        "truth: %d E sequences drawn by %s (%s), target %s, lr %.4g, T=%g, top_p=%g; m in %s; fresh samples %s",
        len(samples.input_ids),
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

    E = Batch.from_samples(samples, model.get_input_embeddings().weight.device, params.compute.logits_chunk_mb)
    result = estimate_truth(
        model,
        E,
        bars.delta_theta,
        multipliers,
        max_tokens=params.compute.max_tokens_per_microbatch,
        behaviour_is_model=same,
        fresh=fresh,
    )
    _warn(result, same, params.reuse.min_ess_fraction)
    out = TruthReport(
        target=target,
        learning_rate=lr,
        delta_h1=report.delta_h1,
        se_delta_h1=report.se_delta_h1,
        **compare_with_prediction(result, target, lr, report.delta_h1, report.targets),
        n_sequences=result["n_sequences"],
        restored_exactly=result["restored_exactly"],
        # provenance and diagnostics
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
        fresh_seed=params.truth.seed if fresh else None,
    )
    with staged_output_dir(out_dir) as tmp:
        out.write(tmp)
    for e in out.etas:
        fr = "" if e.fresh is None else f", fresh {e.fresh.delta_h:+.3e} ± {e.fresh.se or 0:.1e}"
        ratio = "n/a" if e.ratio_snis is None else f"{e.ratio_snis:.3f}"
        log.info(
            "%s η = %g·lr: δH₁ pred %+.3e; SNIS %+.3e ± %.1e (ratio %s, ESS/N %.3f)%s",
            target,
            e.multiplier,
            e.delta_h1_pred,
            e.snis.delta_h,
            e.snis.se or 0,
            ratio,
            e.snis.ess_fraction,
            fr,
        )
    points = "; ".join(f"m={e.multiplier:g}: {e.snis.delta_h:+.3e} (pred {e.delta_h1_pred:+.3e})" for e in out.etas)
    return f"truth: {target} ΔH(m·lr) by SNIS {points} -> {Path(out_dir) / TruthReport.FILE}"


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
