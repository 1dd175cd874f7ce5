"""truth.json: ground-truth ΔH(η) by SNIS over E and by fresh samples, per η and target (docs/math.md §8).

Written by the truth stage, read by the report. Keys and nesting are those of the file:

    target, learning_rate, delta_h1, se_delta_h1 (the configured target's, from delta_h1.json),
    etas [{multiplier, eta, delta_h1_pred, snis {delta_h, se, ess, ess_fraction}, fresh {delta_h, se} | null,
           ratio_snis, ratio_fresh}],
    linearity {delta_h1, slope_snis, curvature_snis, slope_fresh, curvature_fresh},
    targets {sequence, token_mean, seq_mean_token_mean: TruthTarget}, n_sequences, restored_exactly,
    checkpoint_fingerprint, sampler_fingerprint, same_checkpoint, ess_theta, max_abs_logp_diff,
    param_checksum, generation {temperature, top_p, max_new_tokens, stop}, fresh_seed

A standard error is null where it is undefined (one sequence); fresh-sample values are null when
truth.fresh_samples is off; a ratio is null when the prediction is 0.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from .base import JsonArtifact, Record, every_target
from .delta_h1 import Target


class SnisPoint(Record):
    delta_h: float
    se: float | None
    ess: float
    ess_fraction: float


class FreshPoint(Record):
    delta_h: float
    se: float | None


class EtaPoint(Record):
    """ΔH at η = multiplier · lr for the configured target, and the prediction multiplier · δH₁."""

    multiplier: float
    eta: float
    delta_h1_pred: float
    snis: SnisPoint
    fresh: FreshPoint | None
    ratio_snis: float | None
    ratio_fresh: float | None


class Linearity(Record):
    """Least-squares ΔH(m) ≈ slope·m + curvature·m² (docs/math.md §8.3), to compare the slope with δH₁."""

    delta_h1: float
    slope_snis: float | None
    curvature_snis: float | None
    slope_fresh: float | None
    curvature_fresh: float | None


class TruthTarget(Record):
    """One entropy target: delta-h1's estimate, H(θ) and ΔH per η (in the order of `etas`) by both methods."""

    delta_h1: float | None  # null: delta-h1 did not estimate this target (compute.all_targets false)
    se_E: float | None
    entropy_snis: float
    entropy_snis_se: float | None
    entropy_fresh: float | None
    entropy_fresh_se: float | None
    delta_h_snis: list[float]
    se_snis: list[float | None]
    delta_h_fresh: list[float] | None
    se_fresh: list[float | None] | None


class TruthGeneration(Record):
    """The E samples' sampling settings (the fresh samples use the same)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | None


class TruthReport(JsonArtifact):
    FILE: ClassVar[str] = "truth.json"
    STAGE: ClassVar[str] = "truth"

    target: Target
    learning_rate: float
    delta_h1: float
    se_delta_h1: float
    etas: list[EtaPoint]
    linearity: Linearity
    targets: dict[Target, TruthTarget]
    n_sequences: int
    restored_exactly: bool
    checkpoint_fingerprint: str
    sampler_fingerprint: str
    same_checkpoint: bool
    ess_theta: float
    max_abs_logp_diff: float
    param_checksum: str
    generation: TruthGeneration
    fresh_seed: int | None

    _every_target = field_validator("targets")(every_target)


__all__ = ["EtaPoint", "FreshPoint", "Linearity", "SnisPoint", "TruthGeneration", "TruthReport", "TruthTarget"]
