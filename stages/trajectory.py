"""The `trajectory` stage: the probe scored against the steps a trainer really took (docs/math.md §11).

Reads a run dir with a checkpoint every step (`trajectory.run_dir`, default the demo's run) and, per
consecutive pair (k, k+1), compares the entropy change ΔH_obs (exact, or sampled with an SE) with the probe's
forecast δH₁ + δH₂ along simulated steps of the trainer's batch size, and with δH₁, δH₂ along the real step
(`entropy_probe.trajectory`). Writes, staged:
trajectory.json (`Trajectory`), metrics.json (`TrajectoryMetrics`, the calibration summary DVC tracks),
plots/steps.csv and plots/cumulative.csv (DVC plots), steps.png, cumulative.png and trajectory.md (also
returned, the stage's result). Refuses a run dir without two consecutive checkpoints, and probe settings that
change what ΔH_obs measures (max_new_tokens, temperature, top_p other than the trainer's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from entropy_probe import files
from entropy_probe.artifacts.trajectory import TrajectoryMetrics
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.trajectory import score_trajectory, step_pairs
from entropy_probe.trajectory_report import (
    plot_trajectory_cumulative,
    plot_trajectory_steps,
    trajectory_markdown,
    trajectory_tables,
)

log = logging.getLogger(__name__)


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Score every consecutive checkpoint pair of trajectory.run_dir; returns the markdown summary."""
    tp = params.trajectory
    pairs = step_pairs(tp.run_dir, tp.steps)
    if dry_run:
        return (
            f"trajectory plan: {len(pairs)} observed steps of {tp.run_dir} "
            f"({', '.join(f'{p.step}→{p.step + 1}' for p in pairs)}); per step ΔH_obs ({tp.observed}), an E batch "
            f"of {tp.B_E} and a U pool of {tp.B_U} prompts × {params.batch_config.G} at θ(k), {tp.trainer_draws} "
            f"simulated trainer steps of {tp.trainer_B_U} prompts; writes {out_dir}"
        )
    start = time.perf_counter()
    traj = score_trajectory(params, pairs)
    text = trajectory_markdown(traj)
    with staged_output_dir(out_dir) as tmp:
        traj.write(tmp)
        TrajectoryMetrics.of(traj.calibration).write(tmp)
        for name, body in trajectory_tables(traj).items():
            files.write_text(Path(tmp) / "plots" / name, body)
        plot_trajectory_steps(traj, Path(tmp) / "steps.png")
        plot_trajectory_cumulative(traj, Path(tmp) / "cumulative.png")
        files.write_text(Path(tmp) / "trajectory.md", text)
    log.info("trajectory: %d steps scored in %.1f s -> %s", len(traj.steps), time.perf_counter() - start, out_dir)
    return text.removesuffix("\n")
