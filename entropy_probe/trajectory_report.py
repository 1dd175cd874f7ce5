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
    "forecast ± SE",
    "trainer σ",
    "z",
    "z first order",
    "δH₁ pool ± SE",
    "δH₂ pool ± SE",
    "verdict",
    "δH₁_obs exact",
    "δH₁_obs ± SE",
    "δH₂_obs exact",
    "δH₂_obs ± SE",
    "‖Δθ_emul‖/‖Δθ_obs‖",
    "cos(emul, obs)",
    "cos(emul, emul)",
)


def along_step(s) -> tuple[float, float]:
    """(δH₁_obs, δH₂_obs) along the real step: exact where enumerated, else the E batch's estimates."""
    if s.delta_h1_obs_exact is not None:
        return s.delta_h1_obs_exact, s.delta_h2_obs_exact
    return s.delta_h1_obs, s.delta_h2_obs


def trajectory_cells(s) -> list[str]:
    """One row of the trajectory table (a `TrajectoryStep`)."""
    se_u = 0.0 if s.se_U is None else s.se_U
    return [
        f"{s.step}→{s.next_step}",
        fmt(s.learning_rate),
        fmt(s.entropy, ".4f"),
        fmt(s.trainer_entropy, ".4f"),
        fmt(s.delta_h_obs) if s.delta_h_obs_method == "exact" else fmt_pm(s.delta_h_obs, s.se_delta_h_obs),
        fmt_pm(s.forecast, s.se_forecast),
        fmt(s.sd_trainer, ".1e"),
        fmt(s.z, "+.2f"),
        fmt(s.z_first_order, "+.2f"),
        fmt_pm(s.delta_h1_pred, (s.se_E**2 + se_u**2) ** 0.5),
        fmt_pm(s.delta_h2_pred, s.se_delta_h2_pred),
        s.verdict,
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
    if traj.observed == "exact":
        measured = f"ΔH_obs exact by enumeration over {traj.n_population_prompts} prompts"
    else:
        measured = f"ΔH_obs sampled ({traj.B_obs} rows per step, common random numbers + SNIS, ± its SE)"
    curved = f"{c.n_curved} of {c.n_steps} steps curved (outside the linear regime), {c.n_unresolved} unresolved"
    lines = [
        "# Scored against the trainer's own steps",
        "",
        f"Run `{traj.run_dir}`, entropy target `{traj.target}` ({UNITS[traj.target]}); {len(traj.steps)} observed "
        f"steps; {measured}. The trainer steps on {traj.trainer_B_U} prompts ({traj.trainer_B_U_source}); the probe "
        f"drew {traj.B_U} and simulated {traj.trainer_draws} trainer steps from them. {curved}.",
        "",
        "| calibration | forecast δH₁ + δH₂ | first order alone |",
        "|---|---:|---:|",
        f"| z = (ΔH_obs − forecast)/SD: mean | {fmt(c.z_mean, '+.2f')} | {fmt(c.z_first_order_mean, '+.2f')} |",
        f"| z: SD (1 if calibrated) | {fmt(c.z_sd, '.2f')} | {fmt(c.z_first_order_sd, '.2f')} |",
        rf"| share of \|z\| ≤ 2 (0.95 if calibrated) | {fmt(c.z_share_within_2, '.2f')} | "
        f"{fmt(c.z_first_order_share_within_2, '.2f')} |",
        f"| correlation with ΔH_obs | {fmt(c.corr_forecast_obs, '.2f')} | {fmt(c.corr_pred_obs, '.2f')} |",
        "",
        "| along the step actually taken | value |",
        "|---|---:|",
        f"| ΔH_obs explained by the forecast | {fmt(c.explained_by_forecast, '.3f')} |",
        f"| ΔH_obs explained by δH₁_obs (first order, {c.along_step}) | {fmt(c.explained_first_order, '.3f')} |",
        f"| ΔH_obs explained by δH₁_obs + δH₂_obs ({c.along_step}) | {fmt(c.explained_second_order, '.3f')} |",
        f"| sampled δH₁_obs vs exact: z mean, SD | {fmt(c.z_delta_h1_obs_mean, '+.2f')}, "
        f"{fmt(c.z_delta_h1_obs_sd, '.2f')} |",
        f"| sampled δH₂_obs vs exact: z mean, SD | {fmt(c.z_delta_h2_obs_mean, '+.2f')}, "
        f"{fmt(c.z_delta_h2_obs_sd, '.2f')} |",
        "",
        "| " + " | ".join(TRAJECTORY_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(TRAJECTORY_HEADER) - 1)) + "|",
        *("| " + " | ".join(trajectory_cells(s)) + " |" for s in traj.steps),
        "",
        "ΔH_obs = H(θ(k+1)) − H(θ(k)). forecast: δH₁ + δH₂ along simulated trainer steps (each "
        f"{traj.trainer_B_U} of the probe's {traj.B_U} U groups through the real update rule: clipping, AdamW), "
        "± the probe's SE; trainer σ: the spread of the trainer's own draw. z = (ΔH_obs − forecast) / "
        "√(SE² + σ² + SE_obs²); z first order: the same without δH₂. δH₁/δH₂ pool: the probe's whole U pool, with "
        "the linear-regime verdict (curved: |δH₂| > 0.1 |δH₁| at this step size). δH₁_obs, δH₂_obs: first and "
        "second order along the step actually taken (exact, and sampled from E at θ(k)). H trainer log: the "
        "trainer's own batch mean for its batch drawn at θ(k), not the truth. cos(emul, emul): two independent "
        "simulated trainer steps, the yardstick for cos(emul, obs).",
    ]
    return "\n".join(lines) + "\n"


def trajectory_tables(traj) -> dict[str, str]:
    """CSV text of plots/steps.csv (per step; lo/hi = forecast ∓ 2 SD of ΔH_obs − forecast) and
    plots/cumulative.csv."""
    steps = traj.steps
    rows = []
    for s in steps:
        sd = (s.se_forecast**2 + s.sd_trainer**2 + s.se_delta_h_obs**2) ** 0.5
        first, second = along_step(s)
        rows.append(
            [s.step, s.delta_h_obs, s.forecast, s.forecast - 2 * sd, s.forecast + 2 * sd, s.forecast_delta_h1]
            + [first, first + second, s.z, s.z_first_order]
        )
    h0 = steps[0].entropy if steps[0].entropy is not None else steps[0].entropy_sampled
    cum, obs, pred, first_sum = [], 0.0, 0.0, 0.0
    for s in steps:
        obs, pred, first_sum = obs + s.delta_h_obs, pred + s.forecast, first_sum + along_step(s)[0]
        cum.append([s.next_step, h0 + obs, h0 + pred, h0 + first_sum, obs, pred])
    header = ["step", "delta_h_obs", "forecast", "lo", "hi", "forecast_delta_h1", "delta_h1_obs"]
    return {
        "steps.csv": csv_text(header + ["delta_h1_plus_h2_obs", "z", "z_first_order"], rows),
        "cumulative.csv": csv_text(
            ["step", "entropy_obs", "entropy_pred", "entropy_first_order", "cum_delta_h_obs", "cum_forecast"], cum
        ),
    }


def plot_trajectory_steps(traj, path: Path) -> None:
    """Per step: ΔH_obs against the forecast ± 2 SD (its SE and the trainer's own draw), with the first- and
    second-order terms along the real step."""
    unit = UNITS[traj.target]
    fig = figure(max(6.0, 0.45 * len(traj.steps) + 3.0), 4.2)
    ax = fig.add_subplot()
    x = [s.step for s in traj.steps]
    ax.errorbar(
        [k - 0.12 for k in x],
        [s.forecast for s in traj.steps],
        yerr=[2 * (s.se_forecast**2 + s.sd_trainer**2) ** 0.5 for s in traj.steps],
        fmt="o",
        color="C0",
        capsize=4,
        label=r"forecast $\delta H_1 + \delta H_2$ $\pm$ 2 SD (with the trainer's draw)",
    )
    ax.plot(
        x,
        [s.delta_h_obs for s in traj.steps],
        "x",
        color="C3",
        markersize=9,
        markeredgewidth=2,
        label=rf"$\Delta H_{{obs}}$ ({traj.observed})",
        zorder=5,
    )
    ax.plot(
        [k + 0.12 for k in x],
        [along_step(s)[0] for s in traj.steps],
        "s",
        color="C2",
        markersize=4,
        label=rf"$\delta H_1$ along the real step ({traj.calibration.along_step})",
    )
    ax.plot(
        [k + 0.12 for k in x],
        [sum(along_step(s)) for s in traj.steps],
        "^",
        color="C1",
        markersize=4,
        label=rf"$\delta H_1 + \delta H_2$ along the real step ({traj.calibration.along_step})",
    )
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [f"{s.step}→{s.next_step}" for s in traj.steps], fontsize="small")
    ax.set_xlabel("trainer step")
    ax.set_ylabel(f"entropy change ({unit})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title("Each trainer step: forecast vs observed entropy change", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, path)


def plot_trajectory_cumulative(traj, path: Path) -> None:
    """H(θ(k)) along the run (exact, or H(θ(first)) + Σ sampled ΔH_obs), against the cumulative forecasts."""
    unit = UNITS[traj.target]
    steps = traj.steps
    fig = figure(6.0, 4.2)
    ax = fig.add_subplot()
    x = [steps[0].step] + [s.next_step for s in steps]
    h0 = steps[0].entropy if steps[0].entropy is not None else steps[0].entropy_sampled
    observed, pred, first = [h0], [h0], [h0]
    for s in steps:
        observed.append(observed[-1] + s.delta_h_obs)
        pred.append(pred[-1] + s.forecast)
        first.append(first[-1] + along_step(s)[0])
    ax.plot(x, observed, "o-", color="C3", label=f"H observed ({traj.observed})")
    ax.plot(x, pred, "o--", color="C0", label=r"H(first) + $\Sigma$ forecast")
    ax.plot(x, first, "s:", color="C2", markersize=4, label=r"H(first) + $\Sigma\,\delta H_1$ along the real steps")
    logged = [(s.step, s.trainer_entropy) for s in steps if s.trainer_entropy is not None]
    if logged:
        ax.plot(*zip(*logged), "d", color="0.5", markersize=5, label="trainer log (its batch mean)")
    ax.set_xlabel("checkpoint (trainer step)")
    ax.set_ylabel(f"H ({unit})")
    ax.set_title("Cumulative entropy: observed vs forecast")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, path)


__all__ = [
    "along_step",
    "plot_trajectory_cumulative",
    "plot_trajectory_steps",
    "trajectory_cells",
    "trajectory_markdown",
    "trajectory_tables",
]
