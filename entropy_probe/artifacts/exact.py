"""exact.json: exact H, δH₁ = ∇H · Δθ, its finite-difference check and ΔH(η) by enumeration, per target.

Written by the exact stage, read by the report. Keys and nesting are those of the file:

    configured_target, learning_rate, checkpoint_fingerprint, dtype, fd_step,
    n_distinct_prompts, n_e_rows, n_sequences, n_parameters,
    generation {temperature, top_p, max_new_tokens, eos_id},
    targets {sequence, token_mean, seq_mean_token_mean: ExactTarget}

se_delta_h1 is null except for the configured target (delta-h1 gives the total SE for it only); z is null
when SE_E is 0.
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
    delta_h1_linear: float


class ExactTarget(Record):
    """One entropy target: exact values, the sampled estimates they are compared with, z and the FD check."""

    entropy_exact: float
    entropy_estimate: float  # delta-h1's plug-in entropy
    delta_h1_exact: float
    delta_h1: float  # delta-h1's estimate
    se_E: float
    se_delta_h1: float | None
    z: float | None  # (δH₁ − δH₁_exact) / SE_E
    fd_slope: float
    rel_err_fd: float  # |δH₁_exact − fd_slope| / max(|fd_slope|, 1e-300)
    eta_grid: list[EtaPoint]


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

    _every_target = field_validator("targets")(every_target)


__all__ = ["EtaPoint", "ExactGeneration", "ExactReport", "ExactTarget"]
