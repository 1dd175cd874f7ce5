"""Exact values by enumeration, beside the estimates they check (docs/math.md §7).

- `population_token_ids`: every prompt of the dataset E is drawn from, tokenised as sampling does — the
  population of the calibrated z (the exact stage) and of the trajectory's exact ΔH_obs.
- `float64_policy`: the float64 copy of the policy every enumeration runs on, θ = the parameters Δθ names.
- `exact_report`: exact H, ∇H·Δθ, the FD slope and ΔH(η) for E's prompts (and the population), compared with
  delta-h1's estimate: the exact stage's `ExactReport`.
"""

from __future__ import annotations

import logging
import math

import torch

from . import task
from .artifacts.delta_h1 import Bars, DeltaH1Report, TargetEstimate
from .artifacts.exact import EtaPoint, ExactGeneration, ExactReport, ExactTarget
from .artifacts.samples import Samples
from .enumeration import (
    TARGETS,
    delta_h_curve,
    directional,
    e_batch_prompts,
    exact_gradients,
    fd_slopes,
    row_prompts,
    sequences_per_prompt,
)
from .errors import ProbeError
from .perturb import as_float64
from .specs import EnumerationSpec

log = logging.getLogger(__name__)


def check_population(prompt_set: task.PromptSet, samples: Samples) -> None:
    """Refuse a dataset other than the one the samples record (the population they were drawn from)."""
    recorded = samples.meta.dataset
    if recorded.fingerprint != prompt_set.fingerprint or recorded.size != len(prompt_set):
        raise ProbeError(
            f"the E samples were drawn from dataset {recorded.fingerprint} ({recorded.size} records), "
            f"batch_config names {prompt_set.fingerprint} ({len(prompt_set)} records)",
            "point batch_config at the E samples' dataset, or rerun sample-e",
        )


def population_token_ids(prompt_set: task.PromptSet, tokenizer, samples: Samples | None = None) -> list[list[int]]:
    """Every dataset prompt as token ids, tokenised as sampling does (the text as given, no special tokens).

    With `samples`: each row's prompt tokens must equal those of its record (prompt_index), so the population
    is exactly the space the samples' prompts were drawn from, token for token.
    """
    ids = [list(x) for x in tokenizer(prompt_set.prompts, add_special_tokens=False)["input_ids"]]
    if samples is not None:
        rows = row_prompts(samples.input_ids, samples.prompt_lens, samples.n_prompt_cols)
        for row, (i, tokens) in enumerate(zip(samples.prompt_index.tolist(), rows)):
            if not 0 <= i < len(ids) or ids[i] != tokens:
                raise ProbeError(
                    f"E row {row}'s prompt tokens differ from dataset record {i} tokenised now",
                    "rerun sample-e with the current dataset and tokenizer",
                )
    return ids


def sequence_bound(n_prompts: int, vocab_size: int, n_eos: int, max_new_tokens: int) -> int:
    """Upper bound (exact at top_p = 1) on the sequences of n_prompts prompts' enumeration."""
    return n_prompts * sequences_per_prompt(vocab_size, n_eos, max_new_tokens)


def float64_policy(model, trainable: set[str]):
    """The policy as float64 (in place), θ = the parameters named in `trainable` (only those require grad)."""
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ProbeError(
            "exact enumeration needs a floating-point model; this one is quantised", "set checkpoint.use_qlora=false"
        )
    model = as_float64(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    for module in model.modules():  # the true ∇H: an embedding's padding row too (`true_embedding_gradients`)
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    return model


def _z(dh1: float | None, exact: float | None, se_E: float | None) -> float | None:
    """(δH₁ − exact) / SE_E; None without an estimate, an exact value, or with SE_E = 0."""
    if dh1 is None or exact is None or not se_E or not math.isfinite(se_E):
        return None
    return (dh1 - exact) / se_E


def compared(exact: dict, estimate: TargetEstimate | None, multipliers: list[float], lr: float) -> ExactTarget:
    """One target's exact values (`exact`: entropy, delta_h1, fd_slope, curve, population = (H, δH₁) or None)
    next to delta-h1's estimate (None: not estimated): z against the drawn prompts' exact δH₁, z_population
    against the whole population's."""
    dh1, se_E = (None, None) if estimate is None else (estimate.delta_h1, estimate.se_E)
    h_pop, dh1_pop = exact["population"] if exact["population"] is not None else (None, None)
    grid = [
        EtaPoint(
            multiplier=m,
            eta=m * lr,
            delta_h_exact=exact["curve"][j],
            delta_h1_exact_linear=m * exact["delta_h1"],
            delta_h1_linear=None if dh1 is None else m * dh1,
        )
        for j, m in enumerate(multipliers)
    ]
    return ExactTarget(
        entropy_exact=exact["entropy"],
        entropy_estimate=None if estimate is None else estimate.entropy,
        delta_h1_exact=exact["delta_h1"],
        delta_h1=dh1,
        se_E=se_E,
        se_delta_h1=None if estimate is None else estimate.se_delta_h1,
        z=_z(dh1, exact["delta_h1"], se_E),
        fd_slope=exact["fd_slope"],
        rel_err_fd=abs(exact["delta_h1"] - exact["fd_slope"]) / max(abs(exact["fd_slope"]), 1e-300),
        eta_grid=grid,
        entropy_exact_population=h_pop,
        delta_h1_exact_population=dh1_pop,
        z_population=_z(dh1, dh1_pop, se_E),
    )


def exact_values(
    model64, delta, prompts, mult, population_ids, spec: EnumerationSpec, exact_params
) -> tuple[dict, dict]:
    """Per target {entropy, delta_h1, fd_slope, curve, population}, and counts {n_sequences, n_population_sequences}."""
    kw = spec.kwargs(prompts_per_chunk=False)
    chunk = spec.prompts_per_chunk
    values, grads, n_seq = exact_gradients(model64, prompts, mult, prompts_per_chunk=chunk, **kw)
    exact_dh1 = {t: directional(grads[t], delta) for t in TARGETS}
    log.info("exact δH₁: %s", {t: f"{v:.4e}" for t, v in exact_dh1.items()})
    population, n_pop_seq = dict.fromkeys(TARGETS), None
    if population_ids is not None:  # uniform weights 1/n: E draws its prompts uniformly with replacement
        pop_values, pop_grads, n_pop_seq = exact_gradients(model64, population_ids, None, prompts_per_chunk=chunk, **kw)
        population = {t: (pop_values[t], directional(pop_grads[t], delta)) for t in TARGETS}
        log.info("exact δH₁ over the population: %s", {t: f"{v[1]:.4e}" for t, v in population.items()})
    with torch.no_grad():
        slopes = fd_slopes(model64, delta, prompts, mult, step=exact_params.fd_eps, prompts_per_chunk=chunk, **kw)
        curve = delta_h_curve(
            model64, delta, exact_params.eta_multipliers, prompts, mult, base=values, prompts_per_chunk=chunk, **kw
        )
    per_target = {
        t: dict(entropy=values[t], delta_h1=exact_dh1[t], fd_slope=slopes[t], curve=curve[t], population=population[t])
        for t in TARGETS
    }
    return per_target, {"n_sequences": n_seq, "n_population_sequences": n_pop_seq}


def exact_report(model, tokenizer, samples: Samples, prompt_set, bars: Bars, estimate: DeltaH1Report, exact_params):
    """exact.json for the checkpoint `model` (loaded; converted to float64 in place), the E `samples`, the
    step Δθ of `bars` and delta-h1's `estimate` of it. `exact_params`: params `exact`."""
    gen = samples.meta.generation
    if gen.stop:
        raise ProbeError("exact enumeration does not model generation.stop strings", "set generation.stop: null")
    check_population(prompt_set, samples)
    samples.check_fits_model(model, tokenizer)
    from .generation import special_ids

    eos = (special_ids(tokenizer)[0],)  # the stopping rule E was drawn under (not generation_config's eos list)
    spec = EnumerationSpec(
        eos, gen.max_new_tokens, gen.temperature, gen.top_p, exact_params.max_sequences, exact_params.prompts_per_chunk
    )
    prompts, mult = e_batch_prompts(samples.input_ids, samples.prompt_lens, samples.n_prompt_cols)
    pop_bound = sequence_bound(len(prompt_set), model.config.vocab_size, len(eos), gen.max_new_tokens)
    population_ids = None
    if pop_bound > exact_params.max_sequences:  # counted first: no partial population value, no stand-in
        log.warning(
            "exact: the whole population (%d prompts) has up to %d sequences > exact.max_sequences = %d; no population "
            "δH₁ or z_population (raise exact.max_sequences to get the calibrated z)",
            len(prompt_set),
            pop_bound,
            exact_params.max_sequences,
        )
    else:
        population_ids = population_token_ids(prompt_set, tokenizer, samples)
    log.info(
        "exact: %d distinct prompts (%d E rows), T=%g, top_p=%g, max_new_tokens=%d",
        len(prompts),
        sum(mult),
        gen.temperature,
        gen.top_p,
        gen.max_new_tokens,
    )
    bars.check_fits(model)
    model64 = float64_policy(model, set(bars.delta_theta))
    delta = {n: v.to(torch.float64) for n, v in bars.delta_theta.items()}
    values, counts = exact_values(model64, delta, prompts, mult, population_ids, spec, exact_params)
    lr = estimate.learning_rate
    return ExactReport(
        configured_target=estimate.estimator.entropy,
        targets={t: compared(values[t], estimate.targets.get(t), exact_params.eta_multipliers, lr) for t in TARGETS},
        learning_rate=lr,
        generation=ExactGeneration(
            temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, eos_id=list(eos)
        ),
        checkpoint_fingerprint=estimate.checkpoint_fingerprint,
        dtype="float64",
        fd_step=exact_params.fd_eps,
        n_distinct_prompts=len(prompts),
        n_e_rows=sum(mult),
        n_parameters=sum(v.numel() for v in delta.values()),
        n_population_prompts=len(prompt_set),
        **counts,
    )


__all__ = [
    "check_population",
    "compared",
    "exact_report",
    "exact_values",
    "float64_policy",
    "population_token_ids",
    "sequence_bound",
]
