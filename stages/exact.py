"""The `exact` stage: exact H, ∇H · Δθ, the FD slope and ΔH(η) for the E prompts (docs/math.md §7).

Reads the E samples (prompts and generation settings), Δθ and δH₁ from delta-h1 and the checkpoint
fingerprint from verify; enumerates on a float64 copy of the policy; writes exact.json (`ExactReport`).
Also enumerates H and ∇H · Δθ over the whole prompt population E was drawn from (every dataset record,
each 1/n), the reference of the calibrated z-score (§7.4), when it fits in exact.max_sequences.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from entropy_probe import task
from entropy_probe.artifacts.delta_h1 import Bars, DeltaH1Report, TargetEstimate
from entropy_probe.artifacts.exact import EtaPoint, ExactGeneration, ExactReport, ExactTarget
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.enumeration import (
    TARGETS,
    delta_h_curve,
    directional,
    e_batch_prompts,
    exact_gradients,
    fd_slopes,
    row_prompts,
    sequences_per_prompt,
)
from entropy_probe.errors import ProbeError
from entropy_probe.generation import special_ids
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.perturb import as_float64

log = logging.getLogger(__name__)


def _load_model(params: Params):
    """The probed policy (base + adapter), as every other stage loads it."""
    from entropy_probe.checkpoint import load_policy_model, resolve_paths

    return load_policy_model(params.checkpoint, resolve_paths(params.checkpoint))


def _base_config(params: Params):
    """The base model's config (vocabulary, eos), read without loading any weights."""
    from transformers import AutoConfig

    from entropy_probe.checkpoint import resolve_paths

    return AutoConfig.from_pretrained(resolve_paths(params.checkpoint).base_model)


def _load_tokenizer(params: Params):
    """The probed checkpoint's tokenizer (delta-h1 refuses samples drawn with any other)."""
    from entropy_probe.checkpoint import load_tokenizer, resolve_paths

    return load_tokenizer(resolve_paths(params.checkpoint))


def _population(params: Params, samples: Samples) -> task.PromptSet:
    """The dataset the E batch was drawn from (batch_config's), refused unless it is the one E records."""
    prompt_set = task.load_prompts(params.batch_config)
    recorded = samples.meta.dataset
    if recorded.fingerprint != prompt_set.fingerprint or recorded.size != len(prompt_set):
        raise ProbeError(
            f"the E samples were drawn from dataset {recorded.fingerprint} ({recorded.size} records), "
            f"batch_config names {prompt_set.fingerprint} ({len(prompt_set)} records)",
            "point batch_config at the E samples' dataset, or rerun sample-e",
        )
    return prompt_set


def _population_token_ids(prompt_set: task.PromptSet, tokenizer, samples: Samples) -> list[list[int]]:
    """Every dataset prompt as token ids, tokenised as sampling does (the text as given, no special tokens).

    Each E row's prompt tokens must equal those of its record (prompt_index): then the population is
    exactly the space E's prompts were drawn from, token for token.
    """
    ids = [list(x) for x in tokenizer(prompt_set.prompts, add_special_tokens=False)["input_ids"]]
    rows = row_prompts(samples.input_ids, samples.prompt_lens, samples.n_prompt_cols)
    for row, (i, tokens) in enumerate(zip(samples.prompt_index.tolist(), rows)):
        if not 0 <= i < len(ids) or ids[i] != tokens:
            raise ProbeError(
                f"E row {row}'s prompt tokens differ from dataset record {i} tokenised now",
                "rerun sample-e with the current dataset and tokenizer",
            )
    return ids


def _sequence_bound(n_prompts: int, config, n_eos: int, max_new_tokens: int) -> int:
    """Upper bound (exact at top_p = 1) on the sequences of n_prompts prompts' enumeration."""
    return n_prompts * sequences_per_prompt(config.vocab_size, n_eos, max_new_tokens)


def _float64_model(model, bars: Bars):
    """The exact stage's model: float64, θ = the parameters Δθ names (and only those) require grad."""
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ProbeError(
            "exact enumeration needs a floating-point model; this one is quantised", "set checkpoint.use_qlora=false"
        )
    bars.check_fits(model)
    model = as_float64(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in bars.delta_theta)
    return model


def _delta_h1_inputs(params: Params) -> tuple[Bars, DeltaH1Report]:
    """Δθ and delta_h1.json, refused unless delta-h1 ran on the checkpoint verify describes."""
    bars, report = Bars.read(params.paths.delta_h1), DeltaH1Report.read(params.paths.delta_h1)
    fingerprint = VerifyReport.read(params.paths.verify).fingerprint
    report.check_checkpoint(
        fingerprint,
        f"{params.paths.verify} describes",
        "point paths.delta_h1 and paths.verify at the same checkpoint's outputs (dvc repro)",
    )
    return bars, report


def _z(dh1: float | None, exact: float | None, se_E: float | None) -> float | None:
    """(δH₁ − exact) / SE_E; None without an estimate, an exact value, or with SE_E = 0."""
    if dh1 is None or exact is None or not se_E or not math.isfinite(se_E):
        return None
    return (dh1 - exact) / se_E


def _compared(
    entropy: float,
    exact_dh1: float,
    slope: float,
    curve: list[float],
    estimate: TargetEstimate | None,
    multipliers: list[float],
    lr: float,
    population: tuple[float, float] | None,
) -> ExactTarget:
    """One target's exact values next to delta-h1's estimate: z against the drawn prompts' exact δH₁ and
    z_population against the whole population's (`population` = (H, δH₁) there, None when skipped).
    `estimate` None: delta-h1 did not estimate this target (exact values only)."""
    dh1, se_E = (None, None) if estimate is None else (estimate.delta_h1, estimate.se_E)
    h_pop, dh1_pop = population if population is not None else (None, None)
    grid = [
        EtaPoint(
            multiplier=m,
            eta=m * lr,
            delta_h_exact=curve[j],
            delta_h1_exact_linear=m * exact_dh1,
            delta_h1_linear=None if dh1 is None else m * dh1,
        )
        for j, m in enumerate(multipliers)
    ]
    return ExactTarget(
        entropy_exact=entropy,
        entropy_estimate=None if estimate is None else estimate.entropy,
        delta_h1_exact=exact_dh1,
        delta_h1=dh1,
        se_E=se_E,
        se_delta_h1=None if estimate is None else estimate.se_delta_h1,
        z=_z(dh1, exact_dh1, se_E),
        fd_slope=slope,
        rel_err_fd=abs(exact_dh1 - slope) / max(abs(slope), 1e-300),
        eta_grid=grid,
        entropy_exact_population=h_pop,
        delta_h1_exact_population=dh1_pop,
        z_population=_z(dh1, dh1_pop, se_E),
    )


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Exact H, ∇H, δH₁, FD slope and ΔH(η) for the E prompts; writes `out_dir/exact.json`."""
    t0 = time.perf_counter()
    ep = params.exact
    samples = Samples.read(params.paths.sample_e, "samples_e")
    gen = samples.meta.generation
    if gen.stop:
        raise ProbeError("exact enumeration does not model generation.stop strings", "set generation.stop: null")
    prompts, mult = e_batch_prompts(samples.input_ids, samples.prompt_lens, samples.n_prompt_cols)
    if dry_run:
        config = _base_config(params)
        n_eos = 1  # responses end on the tokenizer's eos alone, as sampling stopped them
        bound = _sequence_bound(len(prompts), config, n_eos, gen.max_new_tokens)
        n_pop = len(_population(params, samples))
        pop_bound = _sequence_bound(n_pop, config, n_eos, gen.max_new_tokens)
        exactly = "exactly" if gen.top_p >= 1.0 else "at most (top_p < 1 prunes the tree)"
        print(
            f"exact: {len(prompts)} distinct prompts ({sum(mult)} E rows), {exactly} {bound} sequences to "
            f"enumerate (vocab {config.vocab_size}, max_new_tokens={gen.max_new_tokens}); the whole population: "
            f"{n_pop} prompts, {exactly} {pop_bound} sequences"
            f"{' (over the limit: skipped)' if pop_bound > ep.max_sequences else ''}; limit "
            f"exact.max_sequences={ep.max_sequences}; writes {Path(out_dir) / ExactReport.FILE}"
        )
        return None
    bars, dh1_report = _delta_h1_inputs(params)
    prompt_set = _population(params, samples)
    lr = dh1_report.learning_rate
    model = _load_model(params)
    tokenizer = _load_tokenizer(params)
    samples.check_fits_model(model, tokenizer)
    eos = [special_ids(tokenizer)[0]]  # the stopping rule E was drawn under (not generation_config's eos list)
    pop_bound = _sequence_bound(len(prompt_set), model.config, len(eos), gen.max_new_tokens)
    population_ids = None
    if pop_bound > ep.max_sequences:
        # counted before enumerating: no partial population value, and no E-conditional number in its place
        log.warning(
            "exact: the whole population (%d prompts) has up to %d sequences > exact.max_sequences = %d; "
            "no population δH₁ or z_population (raise exact.max_sequences to get the calibrated z)",
            len(prompt_set),
            pop_bound,
            ep.max_sequences,
        )
    else:
        population_ids = _population_token_ids(prompt_set, tokenizer, samples)
    kw = dict(
        eos_id=eos,
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        max_sequences=ep.max_sequences,
    )
    log.info(
        "exact: %d distinct prompts (%d E rows), T=%g, top_p=%g, max_new_tokens=%d",
        len(prompts),
        sum(mult),
        gen.temperature,
        gen.top_p,
        gen.max_new_tokens,
    )
    model = _float64_model(model, bars)
    delta = {n: v.to(torch.float64) for n, v in bars.delta_theta.items()}

    values, grads, n_seq = exact_gradients(model, prompts, mult, prompts_per_chunk=ep.prompts_per_chunk, **kw)
    exact_dh1 = {t: directional(grads[t], delta) for t in TARGETS}
    log.info("exact δH₁: %s", {t: f"{v:.4e}" for t, v in exact_dh1.items()})
    population, n_pop_seq = {t: None for t in TARGETS}, None
    if population_ids is not None:
        # uniform weights 1/n: E draws its prompts uniformly with replacement from these
        pop_values, pop_grads, n_pop_seq = exact_gradients(
            model, population_ids, None, prompts_per_chunk=ep.prompts_per_chunk, **kw
        )
        population = {t: (pop_values[t], directional(pop_grads[t], delta)) for t in TARGETS}
        log.info("exact δH₁ over the population: %s", {t: f"{v[1]:.4e}" for t, v in population.items()})
    kw_nograd = dict(kw, prompts_per_chunk=ep.prompts_per_chunk)
    with torch.no_grad():
        slopes = fd_slopes(model, delta, prompts, mult, step=ep.fd_eps, **kw_nograd)
        curve = delta_h_curve(model, delta, ep.eta_multipliers, prompts, mult, base=values, **kw_nograd)

    result = ExactReport(
        configured_target=params.estimator.entropy,
        targets={
            t: _compared(
                values[t],
                exact_dh1[t],
                slopes[t],
                curve[t],
                dh1_report.targets.get(t),
                ep.eta_multipliers,
                lr,
                population[t],
            )
            for t in TARGETS
        },
        learning_rate=lr,
        generation=ExactGeneration(
            temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, eos_id=eos
        ),
        checkpoint_fingerprint=dh1_report.checkpoint_fingerprint,
        dtype="float64",
        fd_step=ep.fd_eps,
        n_distinct_prompts=len(prompts),
        n_e_rows=sum(mult),
        n_sequences=n_seq,
        n_parameters=sum(v.numel() for v in delta.values()),
        n_population_prompts=len(prompt_set),
        n_population_sequences=n_pop_seq,
    )
    with staged_output_dir(out_dir) as tmp:
        result.write(tmp)
    for t, r in result.targets.items():
        log.info(
            "%s: H=%.5f  δH₁ exact %.4e (population %s)  estimate %s  z_population %s (given E's prompts %s)  "
            "FD rel err %.1e",
            t,
            r.entropy_exact,
            r.delta_h1_exact,
            _fmt(r.delta_h1_exact_population, ".4e"),
            _fmt(r.delta_h1, ".4e"),
            _fmt(r.z_population, "+.2f"),
            _fmt(r.z, "+.2f"),
            r.rel_err_fd,
        )
    log.info("exact: done in %.1f s", time.perf_counter() - t0)
    main = result.targets[result.configured_target]
    return (
        f"exact: {main.delta_h1_exact:.4e} exact δH₁ ({result.configured_target}), z_population "
        f"{_fmt(main.z_population, '+.2f')} (given E's prompts {_fmt(main.z, '+.2f')}), FD rel err "
        f"{main.rel_err_fd:.1e}, {n_seq} sequences -> {Path(out_dir) / ExactReport.FILE}"
    )


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)
