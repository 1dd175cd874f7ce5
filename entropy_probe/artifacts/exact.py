"""exact.json: exact H, δH₁ = ∇H · Δθ, its finite-difference check and ΔH(η) by enumeration, per target.

Written by the exact stage, read by the report. Keys and nesting are those of the file:

    configured_target, learning_rate, checkpoint_fingerprint, dtype, fd_step,
    n_distinct_prompts, n_e_rows, n_sequences, n_parameters, n_population_prompts, n_population_sequences,
    generation {temperature, top_p, max_new_tokens, eos_id},
    targets {sequence, token_mean, seq_mean_token_mean: ExactTarget}

se_delta_h1 is null except for the configured target (delta-h1 gives the total SE for it only); z and
z_population are null when SE_E is 0. The estimate fields (entropy_estimate, delta_h1, se_E, z, z_population,
eta_grid[].delta_h1_linear) are null for a target delta-h1 did not estimate (it estimates estimator.entropy
only, unless compute.all_targets); the exact values are always there. Two exact references (docs/math.md §7.4):

- `delta_h1_exact`: over the E batch's drawn prompt multiset. SE_E also counts the variance of which prompts
  were drawn, which this comparison holds fixed, so `z` is under-dispersed (SD < 1): a consistency check only.
- `delta_h1_exact_population`: over every prompt of the dataset E was drawn from (each 1/n, as E draws
  uniformly with replacement). `z_population` is the calibrated test, ~N(0, 1) over repeated E draws.
  The *_population fields and n_population_sequences are null when the population's sequence count would
  exceed exact.max_sequences (or the file predates them).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from .base import JsonArtifact, Record, every_target

Target = Literal["sequence", "token_mean", "seq_mean_token_mean"]


class EtaPoint(Record):
    """ΔH at η = multiplier · lr: exact, and the two linear predictions m·δH₁ (exact and sampled)."""

    multiplier: float
    eta: float
    delta_h_exact: float
    delta_h1_exact_linear: float
    delta_h1_linear: float | None  # null: delta-h1 did not estimate this target


class ExactTarget(Record):
    """One entropy target: exact values, the sampled estimates they are compared with, z and the FD check."""

    entropy_exact: float
    entropy_estimate: float | None  # delta-h1's plug-in entropy (null: target not estimated)
    delta_h1_exact: float
    delta_h1: float | None  # delta-h1's estimate (null: target not estimated)
    se_E: float | None
    se_delta_h1: float | None
    z: float | None  # (δH₁ − δH₁_exact) / SE_E, given the drawn prompts: under-dispersed, not calibrated
    fd_slope: float
    rel_err_fd: float  # |δH₁_exact − fd_slope| / max(|fd_slope|, 1e-300)
    eta_grid: list[EtaPoint]
    entropy_exact_population: float | None = None  # H over every prompt of the dataset, each 1/n
    delta_h1_exact_population: float | None = None  # ∇H · Δθ over every prompt of the dataset, each 1/n
    z_population: float | None = None  # (δH₁ − δH₁_exact_population) / SE_E: the calibrated test


class ExactGeneration(Record):
    """The sampling settings the enumeration reproduced (from the E samples) and the eos ids it ended on."""

    temperature: float
    top_p: float
    max_new_tokens: int
    eos_id: list[int]


class ExactReport(JsonArtifact):
    FILE: ClassVar[str] = "exact.json"
    STAGE: ClassVar[str] = "exact"

    configured_target: Target
    targets: dict[Target, ExactTarget]
    learning_rate: float = Field(gt=0)
    generation: ExactGeneration
    checkpoint_fingerprint: str
    dtype: Literal["float64"]
    fd_step: float
    n_distinct_prompts: int
    n_e_rows: int
    n_sequences: int
    n_parameters: int
    n_population_prompts: int | None = None  # records in the dataset E was drawn from
    n_population_sequences: int | None = None  # sequences enumerated for the population (null: skipped)

    _every_target = field_validator("targets")(every_target)


__all__ = ["EtaPoint", "ExactGeneration", "ExactReport", "ExactTarget"]
