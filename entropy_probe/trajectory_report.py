"""The trajectory's report: its table (markdown), plot CSVs (DVC plots) and PNGs (docs/math.md §11).

Numbers are copied from trajectory.json (`artifacts.trajectory.Trajectory`), none is estimated here.
"""

from __future__ import annotations

from pathlib import Path

from .reporting import UNITS, csv_text, figure, fmt, fmt_pm, save_png

TRAJECTORY_HEADER = (
    "step",
    "lr",
    "H exact",
    "H trainer log",
    "ΔH_obs",
    "δH₁_pred ± SE",
    "z",
    "δH₁_obs exact",
    "δH₁_obs ± SE",
    "δH₂_obs exact",
    "δH₂_obs ± SE",
    "‖Δθ_emul‖/‖Δθ_obs‖",
    "cos(emul, obs)",
    "cos(emul, emul)",
)


def trajectory_cells(s) -> list[str]:
    """One row of the trajectory table (a `TrajectoryStep`)."""
    return [
        f"{s.step}→{s.next_step}",
        fmt(s.learning_rate),
        fmt(s.entropy, ".4f"),
        fmt(s.trainer_entropy, ".4f"),
        fmt(s.delta_h_obs),
        fmt_pm(s.delta_h1_pred, s.se_pred),
        fmt(s.z, "+.2f"),
        fmt(s.delta_h1_obs_exact),
        fmt_pm(s.delta_h1_obs, s.se_delta_h1_obs),
        fmt(s.delta_h2_obs_exact),
        fmt_pm(s.delta_h2_obs, s.se_delta_h2_obs),
        fmt(s.norm_ratio, ".2f"),
        fmt(s.cos_emul_obs, ".2f"),
        fmt(s.cos_emul_emul, ".2f"),
    ]


def trajectory_markdown(traj) -> str:
    """The trajectory summary (a `Trajectory`): calibration numbers, then the per-step table and a legend."""
    c = traj.calibration
    lines = [
        "# Scored against the trainer's own steps",
        "",
        f"Run `{traj.run_dir}`, entropy target `{traj.target}` ({UNITS[traj.target]}); {len(traj.steps)} observed "
        f"steps; ΔH_obs exact by enumeration over {traj.n_population_prompts} prompts.",
        "",
        "| calibration | value |",
        "|---|---:|",
        f"| z = (ΔH_obs − δH₁_pred)/SE: mean | {fmt(c.z_mean, '+.2f')} |",
        f"| z: SD (1 if calibrated) | {fmt(c.z_sd, '.2f')} |",
        rf"| share of \|z\| ≤ 2 (0.95 if calibrated) | {fmt(c.z_share_within_2, '.2f')} |",
        f"| correlation of δH₁_pred with ΔH_obs | {fmt(c.corr_pred_obs, '.2f')} |",
        f"| ΔH_obs explained by δH₁_obs (first order) | {fmt(c.explained_first_order, '.3f')} |",
        f"| ΔH_obs explained by δH₁_obs + δH₂_obs | {fmt(c.explained_second_order, '.3f')} |",
        f"| sampled δH₁_obs vs exact: z mean, SD | {fmt(c.z_delta_h1_obs_mean, '+.2f')}, "
        f"{fmt(c.z_delta_h1_obs_sd, '.2f')} |",
        f"| sampled δH₂_obs vs exact: z mean, SD | {fmt(c.z_delta_h2_obs_mean, '+.2f')}, "
        f"{fmt(c.z_delta_h2_obs_sd, '.2f')} |",
        "",
        "| " + " | ".join(TRAJECTORY_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TRAJECTORY_HEADER) - 1)) + "|",
        *("| " + " | ".join(trajectory_cells(s)) + " |" for s in traj.steps),
        "",
        "ΔH_obs = H(θ(k+1)) − H(θ(k)) exact. δH₁_pred: the probe's prediction from its own U draw (adam_step), "
        f"SE = √(SE_E² + SE_U² (1 + B_U/B_U_trainer)) with B_U = {traj.B_U}, B_U_trainer = {traj.trainer_B_U} (the "
        "trainer's step is one more U draw). δH₁_obs, δH₂_obs: first and second order along the step actually taken "
        "(exact, and sampled from E at θ(k)). H trainer log: the trainer's own batch mean for its batch drawn at θ(k), "
        "not the truth. cos(emul, emul): two independent U draws, the yardstick for cos(emul, obs).",
    ]
    return "\n".join(lines) + "\n"


def trajectory_tables(traj) -> dict[str, str]:
    """CSV text of plots/steps.csv (per step; lo/hi = δH₁_pred ∓ 2 SE) and plots/cumulative.csv."""
    steps = traj.steps
    rows = []
    for s in steps:
        se = s.se_pred
        lo, hi = (None, None) if se is None else (s.delta_h1_pred - 2 * se, s.delta_h1_pred + 2 * se)
        rows.append(
            [
                s.step,
                s.delta_h_obs,
                s.delta_h1_pred,
                lo,
                hi,
                s.delta_h1_obs_exact,
                s.delta_h1_obs_exact + s.delta_h2_obs_exact,
                s.z,
            ]
        )
    cum, obs, pred, first = [], 0.0, 0.0, 0.0
    for s in steps:
        obs, pred, first = obs + s.delta_h_obs, pred + s.delta_h1_pred, first + s.delta_h1_obs_exact
        cum.append([s.next_step, s.entropy_next, steps[0].entropy + pred, steps[0].entropy + first, obs, pred])
    return {
        "steps.csv": csv_text(
            ["step", "delta_h_obs", "delta_h1_pred", "lo", "hi", "delta_h1_obs", "delta_h1_plus_h2_obs", "z"], rows
        ),
        "cumulative.csv": csv_text(
            ["step", "entropy_obs", "entropy_pred", "entropy_first_order", "cum_delta_h_obs", "cum_delta_h1_pred"], cum
        ),
    }


def plot_trajectory_steps(traj, path: Path) -> None:
    """Per step: ΔH_obs against δH₁_pred ± 2 SE, with the exact first- and second-order terms along the real step."""
    unit = UNITS[traj.target]
    fig = figure(max(6.0, 0.45 * len(traj.steps) + 3.0), 4.2)
    ax = fig.add_subplot()
    x = [s.step for s in traj.steps]
    ax.errorbar(
        [k - 0.12 for k in x],
        [s.delta_h1_pred for s in traj.steps],
        yerr=[2 * (s.se_pred or 0.0) for s in traj.steps],
        fmt="o",
        color="C0",
        capsize=4,
        label=r"$\delta H_1$ predicted (own U draw) $\pm$ 2 SE",
    )
    ax.plot(
        x,
        [s.delta_h_obs for s in traj.steps],
        "x",
        color="C3",
        markersize=9,
        markeredgewidth=2,
        label=r"$\Delta H_{obs}$ (exact)",
        zorder=5,
    )
    ax.plot(
        [k + 0.12 for k in x],
        [s.delta_h1_obs_exact for s in traj.steps],
        "s",
        color="C2",
        markersize=4,
        label=r"$\delta H_1$ along the real step (exact)",
    )
    ax.plot(
        [k + 0.12 for k in x],
        [s.delta_h1_obs_exact + s.delta_h2_obs_exact for s in traj.steps],
        "^",
        color="C1",
        markersize=4,
        label=r"$\delta H_1 + \delta H_2$ along the real step (exact)",
    )
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [f"{s.step}→{s.next_step}" for s in traj.steps], fontsize="small")
    ax.set_xlabel("trainer step")
    ax.set_ylabel(f"entropy change ({unit})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("Each trainer step: predicted vs observed entropy change", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, path)


def plot_trajectory_cumulative(traj, path: Path) -> None:
    """Exact H(θ(k)) along the run, against H(θ(first)) plus the cumulative predictions."""
    unit = UNITS[traj.target]
    steps = traj.steps
    fig = figure(6.0, 4.2)
    ax = fig.add_subplot()
    x = [steps[0].step] + [s.next_step for s in steps]
    h0 = steps[0].entropy
    pred, first = [h0], [h0]
    for s in steps:
        pred.append(pred[-1] + s.delta_h1_pred)
        first.append(first[-1] + s.delta_h1_obs_exact)
    ax.plot(x, [h0] + [s.entropy_next for s in steps], "o-", color="C3", label="H exact (observed)")
    ax.plot(x, pred, "o--", color="C0", label=r"H(first) + $\Sigma\,\delta H_1$ predicted")
    ax.plot(x, first, "s:", color="C2", markersize=4, label=r"H(first) + $\Sigma\,\delta H_1$ along the real steps")
    logged = [(s.step, s.trainer_entropy) for s in steps if s.trainer_entropy is not None]
    if logged:
        ax.plot(*zip(*logged), "d", color="0.5", markersize=5, label="trainer log (its batch mean)")
    ax.set_xlabel("checkpoint (trainer step)")
    ax.set_ylabel(f"H ({unit})")
    ax.set_title("Cumulative entropy: observed vs predicted")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, path)


__all__ = [
    "plot_trajectory_cumulative",
    "plot_trajectory_steps",
    "trajectory_cells",
    "trajectory_markdown",
    "trajectory_tables",
]
