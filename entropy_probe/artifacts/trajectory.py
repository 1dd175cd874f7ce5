"""What the trajectory stage writes: trajectory.json (`Trajectory`) and metrics.json (`TrajectoryMetrics`).

One `TrajectoryStep` per consecutive checkpoint pair (k, k+1) of a run dir: the observed entropy change
ΔH_obs, the exact first- and second-order terms along the real step Δθ_obs = θ(k+1) − θ(k) with their
sampled estimates and z-tests, the forecast (δH₁ + δH₂ along simulated steps of the trainer's batch size, with
the spread of the trainer's own draw), the probe's pool δH₁ with its linear-regime verdict, the emulation check
(simulated Δθ against Δθ_obs, beside the cosine of two independent draws), and the trainer's own logged entropy
(its batch mean, shown beside the exact H, never as the truth). docs/math.md §11.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import field_validator

from .base import JsonArtifact, Record

Target = Literal["sequence", "token_mean", "seq_mean_token_mean"]


class SampledObservation(Record):
    """ΔH_obs from samples (`observed_entropy.sampled_delta_h`): fresh responses at θ(k) and θ(k+1) with common
    random numbers, SNIS of an E batch drawn at θ(k), and their minimum-variance combination."""

    n_sequences: int
    fresh_delta_h: float
    fresh_se: float
    snis_delta_h: float | None  # None where undefined (every weight 0)
    snis_se: float | None
    snis_ess_fraction: float  # ESS/N of the E batch's weights at θ(k+1)
    weight_fresh: float  # λ: ΔH_obs = λ·fresh + (1 − λ)·SNIS
    method: str

    @classmethod
    def of(cls, sampled) -> "SampledObservation":
        """From `observed_entropy.SampledDeltaH` (its NaNs as None)."""
        values = {k: getattr(sampled, k) for k in cls.model_fields}
        return cls(**{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()})


class TrajectoryStep(Record):
    """One observed step θ(step) → θ(next_step)."""

    step: int  # k: the checkpoint the step starts from (its global step)
    next_step: int
    checkpoint: str
    next_checkpoint: str
    learning_rate: float  # the lr of this step (the optimizer's stored next lr at checkpoint k)
    # entropy (the configured target) over the prompt population
    entropy: float | None  # H(θ(k)), exact (None when ΔH_obs is sampled)
    entropy_next: float | None  # H(θ(k+1)), exact
    entropy_sampled: float  # the E batch's estimate of H(θ(k))
    trainer_entropy: float | None  # the trainer's logged `entropy` for its batch drawn at θ(k): a batch mean
    # ΔH_obs = H(θ(k+1)) − H(θ(k))
    delta_h_obs: float
    delta_h_obs_method: Literal["exact", "sampled"]  # exact: enumeration over the whole prompt population
    se_delta_h_obs: float  # 0 when exact
    sampled: SampledObservation | None  # how the sampled ΔH_obs was formed
    # along the step actually taken: exact (central differences of exact H; None when sampled) and from E at θ(k)
    delta_h1_obs_exact: float | None
    delta_h2_obs_exact: float | None
    delta_h1_obs: float
    se_delta_h1_obs: float
    z_delta_h1_obs: float | None  # (δH₁_obs − exact) / SE; None when SE = 0 or no exact value
    delta_h2_obs: float
    se_delta_h2_obs: float
    z_delta_h2_obs: float | None
    # the forecast: δH₁ + δH₂ along simulated trainer steps (trainer_B_U of the probe's B_U groups, the real rule)
    forecast: float  # F̄ = mean over draws of X̄·Δθ_S + δH₂(Δθ_S)
    forecast_delta_h1: float  # its first-order part
    forecast_delta_h2: float  # its second-order part
    se_forecast: float  # the probe's uncertainty: √(SE_E² + σ_T² (B_T/B_U + 1/K))
    sd_trainer: float  # σ_T: the spread of the trainer's own draw
    z: float | None  # (ΔH_obs − F̄) / √(SE_F² + σ_T² + SE_obs²); None when that is 0
    se_forecast_first_order: float  # the same for the first order alone
    sd_trainer_first_order: float
    z_first_order: float | None  # (ΔH_obs − mean X̄·Δθ_S) / its spread
    # the probe's own pool of B_U groups: δH₁ ± (SE_E, SE_U), δH₂ along its Δθ and the linear-regime verdict
    delta_h1_pred: float
    se_E: float
    se_U: float | None  # None: fewer than 2 U groups with non-zero advantage
    delta_h2_pred: float
    se_delta_h2_pred: float
    verdict: Literal["linear", "curved", "unresolved"]
    eta_star: float | None
    # emulation check: the simulated trainer steps against the real one
    norm_delta_theta_obs: float
    norm_ratio: float  # mean over draws of ‖Δθ_S‖ / ‖Δθ_obs‖
    cos_emul_obs: float  # mean cos(Δθ_S, Δθ_obs)
    cos_emul_emul: float  # mean cos of two independent draws: the yardstick for cos_emul_obs


class CalibrationMetrics(Record):
    """The calibration summary (`entropy_probe.calibration.Calibration`); `TrajectoryMetrics` is its head."""

    n_steps: int
    n_steps_z: int | None
    z_mean: float | None  # the forecast's z (δH₁ + δH₂ along simulated trainer steps)
    z_sd: float | None
    z_share_within_2: float | None
    z_first_order_mean: float | None  # the first order alone
    z_first_order_sd: float | None
    z_first_order_share_within_2: float | None
    corr_forecast_obs: float | None
    corr_pred_obs: float | None  # the first-order forecast's correlation with ΔH_obs
    explained_by_forecast: float | None  # R² of ΔH_obs by the forecast
    explained_first_order: float | None  # R² of ΔH_obs by δH₁_obs (along the real step)
    explained_second_order: float | None  # R² of ΔH_obs by δH₁_obs + δH₂_obs
    along_step: Literal["exact", "sampled"]  # where explained_* take δH₁_obs, δH₂_obs from
    z_delta_h1_obs_mean: float | None
    z_delta_h1_obs_sd: float | None
    z_delta_h2_obs_mean: float | None
    z_delta_h2_obs_sd: float | None
    n_curved: int  # steps whose pool step is outside the linear regime (verdict curved)
    n_unresolved: int


class TrajectoryMetrics(JsonArtifact):
    """metrics.json: the forecast's calibration over the run, compact enough for one `dvc metrics show` line
    (the along-step z summaries are in trajectory.json's `calibration`)."""

    FILE: ClassVar[str] = "metrics.json"
    STAGE: ClassVar[str] = "trajectory"

    n_steps: int
    z_mean: float | None
    z_sd: float | None
    z_share_within_2: float | None
    z_first_order_sd: float | None
    corr_forecast_obs: float | None
    explained_second_order: float | None

    @classmethod
    def of(cls, calibration: CalibrationMetrics) -> "TrajectoryMetrics":
        return cls(**calibration.model_dump(include=set(cls.model_fields)))


class Trajectory(JsonArtifact):
    FILE: ClassVar[str] = "trajectory.json"
    STAGE: ClassVar[str] = "trajectory"

    run_dir: str
    target: Target
    B_E: int
    B_U: int
    G: int
    trainer_B_U: int  # the trainer's prompts per step (its U draw)
    trainer_B_U_source: str  # where trainer_B_U came from
    trainer_draws: int  # K simulated trainer steps per forecast
    observed: Literal["exact", "sampled"]  # how ΔH_obs was measured
    B_obs: int | None  # sampled: E rows (and fresh responses) per ΔH_obs
    fd_eps: float  # exact δH₁, δH₂ from H(θ(k) ± fd_eps·Δθ_obs)
    n_population_prompts: int
    n_population_sequences: int | None  # sequences enumerated per H evaluation (None: sampled)
    steps: list[TrajectoryStep]
    calibration: CalibrationMetrics

    @field_validator("steps")
    @classmethod
    def _consecutive(cls, steps: list[TrajectoryStep]) -> list[TrajectoryStep]:
        if not steps:
            raise ValueError("no steps")
        if any(s.next_step <= s.step for s in steps) or any(a.step >= b.step for a, b in zip(steps, steps[1:])):
            raise ValueError("steps must be increasing pairs (step < next_step)")
        return steps


__all__ = ["CalibrationMetrics", "SampledObservation", "Trajectory", "TrajectoryMetrics", "TrajectoryStep"]
