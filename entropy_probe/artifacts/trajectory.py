"""What the trajectory stage writes: trajectory.json (`Trajectory`) and metrics.json (`TrajectoryMetrics`).

One `TrajectoryStep` per consecutive checkpoint pair (k, k+1) of a run dir: the observed entropy change
ΔH_obs, the exact first- and second-order terms along the real step Δθ_obs = θ(k+1) − θ(k) with their
sampled estimates and z-tests, the probe's prediction δH₁_pred from its own U draw, the emulation check
(Δθ_emul against Δθ_obs, beside the cosine of two independent U draws' Δθ_emul), and the trainer's own
logged entropy (its batch mean, shown beside the exact H, never as the truth). docs/math.md §11.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import field_validator

from .base import JsonArtifact, Record

Target = Literal["sequence", "token_mean", "seq_mean_token_mean"]


class TrajectoryStep(Record):
    """One observed step θ(step) → θ(next_step)."""

    step: int  # k: the checkpoint the step starts from (its global step)
    next_step: int
    checkpoint: str
    next_checkpoint: str
    learning_rate: float  # the lr of this step (the optimizer's stored next lr at checkpoint k)
    # entropy (the configured target) over the prompt population
    entropy: float  # H(θ(k)), exact
    entropy_next: float  # H(θ(k+1)), exact
    entropy_sampled: float  # the E batch's estimate of H(θ(k))
    trainer_entropy: float | None  # the trainer's logged `entropy` for its batch drawn at θ(k): a batch mean
    # ΔH_obs = H(θ(k+1)) − H(θ(k))
    delta_h_obs: float
    delta_h_obs_method: Literal["exact"]  # exact: enumeration over the whole prompt population
    # along the step actually taken: exact (central differences of exact H) and sampled at θ(k)
    delta_h1_obs_exact: float
    delta_h2_obs_exact: float
    delta_h1_obs: float
    se_delta_h1_obs: float
    z_delta_h1_obs: float | None  # (δH₁_obs − exact) / SE; None when SE = 0
    delta_h2_obs: float
    se_delta_h2_obs: float
    z_delta_h2_obs: float | None
    # the probe's prediction from its own U draw (adam_step with the checkpoint's optimizer state)
    delta_h1_pred: float
    se_E: float
    se_U: float | None  # None: fewer than 2 U groups with non-zero advantage
    se_pred: float | None  # √(SE_E² + SE_U² (1 + B_U/B_U_trainer))
    z: float | None  # (ΔH_obs − δH₁_pred) / se_pred
    delta_h1_pred_second_draw: float  # from an independent U draw
    # emulation check
    norm_delta_theta_obs: float
    norm_ratio: float  # ‖Δθ_emul‖ / ‖Δθ_obs‖ (first draw)
    cos_emul_obs: float  # cos(Δθ_emul, Δθ_obs), first draw
    cos_emul_obs_second_draw: float
    cos_emul_emul: float  # cos of the two draws' Δθ_emul: the yardstick for cos_emul_obs


class CalibrationMetrics(Record):
    """The calibration summary (`entropy_probe.calibration.Calibration`); `TrajectoryMetrics` is its head."""

    n_steps: int
    z_mean: float | None
    z_sd: float | None
    z_share_within_2: float | None
    corr_pred_obs: float | None
    explained_first_order: float | None
    explained_second_order: float | None
    z_delta_h1_obs_mean: float | None
    z_delta_h1_obs_sd: float | None
    z_delta_h2_obs_mean: float | None
    z_delta_h2_obs_sd: float | None
    n_steps_z: int | None = None  # the steps with an SE_U, over which z is summarised (None: written before it)


class TrajectoryMetrics(JsonArtifact):
    """metrics.json: the forecast's calibration over the run, compact enough for one `dvc metrics show` line
    (the along-step z summaries are in trajectory.json's `calibration`)."""

    FILE: ClassVar[str] = "metrics.json"
    STAGE: ClassVar[str] = "trajectory"

    n_steps: int
    z_mean: float | None
    z_sd: float | None
    z_share_within_2: float | None
    corr_pred_obs: float | None
    explained_first_order: float | None
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
    fd_eps: float  # exact δH₁, δH₂ from H(θ(k) ± fd_eps·Δθ_obs)
    n_population_prompts: int
    n_population_sequences: int  # sequences enumerated per H evaluation
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


__all__ = ["CalibrationMetrics", "Trajectory", "TrajectoryMetrics", "TrajectoryStep"]
