"""What the report stage writes besides markdown, plots and PNGs: report.json and the per-checkpoint metrics.

- report.json (`Report`): the table's numbers, {target, checkpoints: {name: `CheckpointRow`}}, in
  `probe.checkpoints` order; None where a number is not available (no exact or truth run, no reuse).
- metrics/<name>.json (`CheckpointMetrics`): the few numbers DVC tracks as metrics per probed checkpoint
  (δH₁ ± SE, the z-score against exact, the ESS fractions of reused samples, truth over prediction).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Self

from ..files import write_json
from .base import JsonArtifact, Record, read_validated

Target = Literal["sequence", "token_mean", "seq_mean_token_mean"]


class CheckpointRow(Record):
    """One probed checkpoint: copied from verify/delta_h1/exact/truth, plus z and the truth/prediction ratios."""

    step: int | float  # verify: Adam's step count
    global_step: int | None  # verify: trainer_state's
    target: Target
    # delta_h1.json, the configured target
    delta_h1: float
    se_delta_h1: float
    se_E: float
    se_U: float | None  # null: not estimable (fewer than 2 moving U groups) or an observed step (no U)
    entropy: float
    learning_rate: float
    # null for an observed step (no U batch); naive: only with compute.all_targets
    delta_h1_gradient_part: float | None
    delta_h1_momentum_part: float | None
    delta_h1_naive: float | None
    cov_logp_advantage: float | None
    ess_fraction_E: float | None  # only when the samples were importance-weighted
    ess_fraction_U: float | None
    # exact.json
    exact_delta_h1: float | None
    exact_z: float | None  # (δH₁ − δH₁_exact) / SE_E
    # over which prompts exact_delta_h1 is exact: the whole prompt population (the calibrated z), or only the
    # drawn E prompts (a consistency check whose z is under-dispersed) when the population was too large
    exact_scope: Literal["population", "E prompts"] | None = None
    # truth.json, at η = lr (multiplier 1)
    truth_snis: float | None
    truth_snis_se: float | None
    truth_snis_ess_fraction: float | None
    truth_fresh: float | None
    truth_fresh_se: float | None
    ratio_snis: float | None  # ΔH(lr) / δH₁
    ratio_fresh: float | None
    truth_slope_snis: float | None  # a of the fit ΔH(m) ≈ a m + b m²
    truth_slope_fresh: float | None


class Report(JsonArtifact):
    FILE: ClassVar[str] = "report.json"
    STAGE: ClassVar[str] = "report"

    target: Target
    checkpoints: dict[str, CheckpointRow]


class CheckpointMetrics(Record):
    """metrics/<checkpoint>.json: the numbers `dvc metrics show` lists, one file per probed checkpoint."""

    DIR: ClassVar[str] = "metrics"

    delta_h1: float
    se_delta_h1: float
    exact_z: float | None
    ess_fraction_E: float | None
    ess_fraction_U: float | None
    truth_ratio_snis: float | None  # ΔH(lr) / δH₁ by SNIS
    truth_ratio_fresh: float | None  # ΔH(lr) / δH₁ by fresh samples

    @classmethod
    def of(cls, row: CheckpointRow) -> Self:
        return cls(
            delta_h1=row.delta_h1,
            se_delta_h1=row.se_delta_h1,
            # only the calibrated z is a metric: a drawn-E z is under-dispersed (docs/math.md §7.4)
            exact_z=row.exact_z if row.exact_scope == "population" else None,
            ess_fraction_E=row.ess_fraction_E,
            ess_fraction_U=row.ess_fraction_U,
            truth_ratio_snis=row.ratio_snis,
            truth_ratio_fresh=row.ratio_fresh,
        )

    @classmethod
    def path(cls, report_dir: str | Path, checkpoint: str) -> Path:
        return Path(report_dir) / cls.DIR / f"{checkpoint}.json"

    def write(self, report_dir: str | Path, checkpoint: str) -> Path:
        path = self.path(report_dir, checkpoint)
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, report_dir: str | Path, checkpoint: str) -> Self:
        """Read and validate; a missing or malformed file is a one-line ProbeError naming the stage to re-run."""
        return read_validated(cls, cls.path(report_dir, checkpoint), "report")


__all__ = ["CheckpointMetrics", "CheckpointRow", "Report"]
