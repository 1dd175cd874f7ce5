"""The report's numbers and pictures: one row per probed checkpoint, the markdown table, plot CSVs, PNGs.

No new estimates (docs/math.md §9); everything is copied from the stage outputs except:

    z        = (δH₁ − δH₁_exact) / SE_E        read from exact.json: δH₁_exact over the whole prompt
                                               population (Δθ fixed), so only the E batch's sampling error —
                                               which prompts were drawn included — separates them; over the
                                               drawn E prompts only when the population was too large to
                                               enumerate (exact_scope says which)
    δH₁(η)   = (η / lr) · δH₁  = m · δH₁       the first-order prediction at η = m · lr, drawn with a
                                               band of ±2 · SE(δH₁) · η/lr
    ratio    = ΔH(lr) / δH₁                    truth over prediction at m = 1 (1 = perfect)

Units: nats per sequence for the `sequence` target, nats per token otherwise.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from .artifacts.delta_h1 import DeltaH1Report
from .artifacts.exact import ExactReport
from .artifacts.report import CheckpointRow
from .artifacts.truth import TruthReport
from .artifacts.verify import VerifyReport
from .errors import ProbeError

DASH = "–"
TOP_K = 10  # U groups shown in the "most entropy-lowering" list and plot
REL_TOL = 1e-4  # exact/truth must describe the same δH₁ run (targets' δH₁ agree with the top level to ~1e-7)
UNITS = {"sequence": "nats/sequence", "token_mean": "nats/token", "seq_mean_token_mean": "nats/token"}
DELTA_H1_KEYS = (
    "delta_h1",
    "se_delta_h1",
    "se_E",
    "se_U",
    "entropy",
    "learning_rate",
    "delta_h1_gradient_part",
    "delta_h1_momentum_part",
    "delta_h1_naive",
    "cov_logp_advantage",
)  # copied from delta_h1.json as they are
TRUTH_KEYS = (
    "truth_snis",
    "truth_snis_se",
    "truth_snis_ess_fraction",
    "truth_fresh",
    "truth_fresh_se",
    "ratio_snis",
    "ratio_fresh",
    "truth_slope_snis",
    "truth_slope_fresh",
)


# ----------------------------------------------------------------------------------------------
# one checkpoint's row and ΔH(η) curve


@dataclass
class CurvePoint:
    """ΔH at η = multiplier · lr: the prediction m·δH₁ and whatever truth and exact measured there."""

    multiplier: float
    eta: float = 0.0
    delta_h1_pred: float = 0.0
    truth_snis: float | None = None
    truth_snis_se: float | None = None
    truth_fresh: float | None = None
    truth_fresh_se: float | None = None
    exact: float | None = None


CURVE_COLUMNS = (
    "multiplier",
    "eta",
    "delta_h1_pred",
    "truth_snis",
    "truth_snis_se",
    "truth_fresh",
    "truth_fresh_se",
    "exact",
)


@dataclass
class Probe:
    """One checkpoint: its table row and its ΔH(η) curve (sorted by multiplier)."""

    name: str
    row: CheckpointRow
    curve: list[CurvePoint] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # the optional stages whose output was absent


@dataclass(frozen=True)
class UGroup:
    """One U prompt group's contribution to δH₁, with its prompt and responses (→ rewards) as text."""

    contribution: float
    prompt: str
    responses: str


def _same(a: float, b: float | None, where: str, name: str, what: str) -> None:
    """Refuse an exact/truth artifact computed from a different δH₁ run (stale: dvc would rerun it)."""
    if b is None or not math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-300):
        raise ProbeError(
            f"{where} of checkpoint '{name}' has {what} {b!r}, but delta_h1.json has {a!r} (stale)",
            "rerun its stage (dvc repro)",
        )


class _Curve(dict):
    """multiplier -> CurvePoint, merging multipliers equal to 1e-9 (exact's and truth's grids are unioned)."""

    def at(self, m: float) -> CurvePoint:
        key = next((k for k in self if math.isclose(k, m, rel_tol=1e-9)), m)
        return self.setdefault(key, CurvePoint(multiplier=key))


def _truth_numbers(truth: TruthReport, curve: _Curve, target: str, d1: float, lr: float, name: str) -> dict:
    """truth.json's ΔH(η) points into `curve`; returns the row's truth_* numbers at η = lr and the fit slopes."""
    if truth.target != target:
        raise ProbeError(
            f"truth.json of checkpoint '{name}' is for target {truth.target!r}, delta_h1.json for {target!r}",
            "rerun truth (dvc repro)",
        )
    _same(d1, truth.delta_h1, "truth.json", name, "δH₁")
    _same(lr, truth.learning_rate, "truth.json", name, "learning_rate")
    row = {}
    for e in truth.etas:
        p = curve.at(e.multiplier)
        p.truth_snis, p.truth_snis_se = e.snis.delta_h, e.snis.se
        if e.fresh is not None:
            p.truth_fresh, p.truth_fresh_se = e.fresh.delta_h, e.fresh.se
        if math.isclose(p.multiplier, 1.0, rel_tol=1e-9):
            row.update(
                truth_snis=p.truth_snis,
                truth_snis_se=p.truth_snis_se,
                truth_snis_ess_fraction=e.snis.ess_fraction,
                truth_fresh=p.truth_fresh,
                truth_fresh_se=p.truth_fresh_se,
            )
    row.update(truth_slope_snis=truth.linearity.slope_snis, truth_slope_fresh=truth.linearity.slope_fresh)
    return row


def checkpoint_probe(
    name: str,
    verify: VerifyReport,
    delta_h1: DeltaH1Report,
    exact: ExactReport | None,
    truth: TruthReport | None,
    default_multipliers: list[float],
) -> Probe:
    """One checkpoint's table row and ΔH(η) curve from its artifacts (exact and truth optional).

    Without exact and truth the curve is the prediction alone, on `default_multipliers`.
    """
    target = delta_h1.target
    row: dict = {"step": verify.step, "global_step": verify.global_step, "target": target}
    row.update({k: getattr(delta_h1, k) for k in DELTA_H1_KEYS})
    weighted = delta_h1.reuse.weighted
    row["ess_fraction_E"] = delta_h1.reuse.ess_fraction_E if weighted else None
    row["ess_fraction_U"] = delta_h1.reuse.ess_fraction_U if weighted else None
    d1, lr = delta_h1.delta_h1, delta_h1.learning_rate

    curve = _Curve()
    row.update(exact_delta_h1=None, exact_z=None, exact_scope=None)
    if exact is not None:
        t = exact.targets[target]
        _same(d1, t.delta_h1, "exact.json", name, "δH₁")
        if t.delta_h1_exact_population is not None:  # the calibrated test (docs/math.md §7.4)
            row.update(exact_delta_h1=t.delta_h1_exact_population, exact_z=t.z_population, exact_scope="population")
        else:
            row.update(exact_delta_h1=t.delta_h1_exact, exact_z=t.z, exact_scope="E prompts")
        for g in t.eta_grid:
            curve.at(g.multiplier).exact = g.delta_h_exact
    row.update(dict.fromkeys(TRUTH_KEYS))
    if truth is not None:
        row.update(_truth_numbers(truth, curve, target, d1, lr, name))
    for kind in ("snis", "fresh"):
        dh_lr = row[f"truth_{kind}"]
        row[f"ratio_{kind}"] = dh_lr / d1 if dh_lr is not None and d1 != 0 else None

    if not curve:
        for m in default_multipliers:
            curve.at(float(m))
    points = [curve[m] for m in sorted(curve)]
    for p in points:
        p.eta, p.delta_h1_pred = p.multiplier * lr, p.multiplier * d1
    missing = [stage for stage, report in (("exact", exact), ("truth", truth)) if report is None]
    return Probe(name=name, row=CheckpointRow(**row), curve=points, missing=missing)


def top_u_groups(groups: list[UGroup], k: int = TOP_K) -> list[UGroup]:
    """The U groups with the most negative contribution to δH₁ (at most k, negatives only), most negative first."""
    return sorted((g for g in groups if g.contribution < 0), key=lambda g: g.contribution)[:k]


# ----------------------------------------------------------------------------------------------
# table


def fmt(x, spec: str = ".3g") -> str:
    return DASH if x is None else format(x, spec)


def fmt_pm(x, se, spec: str = ".3g") -> str:
    return DASH if x is None else f"{x:{spec}} ± {fmt(se, spec)}"


def _text(s: str, limit: int = 80) -> str:
    """One line, no backticks (safe inside a markdown code span), shortened to `limit` characters."""
    s = s.replace("\n", "\\n").replace("`", "'")
    return s if len(s) <= limit else s[: limit - 1] + "…"


HEADER = (
    "checkpoint",
    "step",
    "lr",
    "H",
    "δH₁ ± SE",
    "gradient part",
    "momentum part",
    "naive δH₁",
    "Cov(log π, A)",
    "ESS/N (E, U)",
    "exact δH₁",
    "z",
    "ΔH(lr) SNIS ± SE",
    "ΔH(lr) fresh ± SE",
    "ΔH/δH₁ (SNIS, fresh)",
)


def table_cells(name: str, r: CheckpointRow) -> list[str]:
    """One markdown table row; "–" where a number is not available."""
    ess = DASH if r.ess_fraction_E is None else f"{fmt(r.ess_fraction_E, '.2f')}, {fmt(r.ess_fraction_U, '.2f')}"
    ratio = (
        DASH
        if r.ratio_snis is None and r.ratio_fresh is None
        else (f"{fmt(r.ratio_snis, '.2f')}, {fmt(r.ratio_fresh, '.2f')}")
    )
    return [
        name,
        fmt(r.step, "d") if isinstance(r.step, int) else fmt(r.step),
        fmt(r.learning_rate),
        fmt(r.entropy, ".4g"),
        fmt_pm(r.delta_h1, r.se_delta_h1),
        fmt(r.delta_h1_gradient_part),
        fmt(r.delta_h1_momentum_part),
        fmt(r.delta_h1_naive),
        fmt(r.cov_logp_advantage),
        ess,
        fmt(r.exact_delta_h1) + ("*" if r.exact_scope == "E prompts" else ""),
        fmt(r.exact_z, "+.2f"),
        fmt_pm(r.truth_snis, r.truth_snis_se),
        fmt_pm(r.truth_fresh, r.truth_fresh_se),
        ratio,
    ]


def markdown(probes: list[Probe], top: list[UGroup], last: str) -> str:
    """The report: the per-checkpoint table, a legend, and the top entropy-lowering U groups of `last`."""
    target = probes[0].row.target
    lines = [
        "# Entropy probe report",
        "",
        f"Entropy target `{target}` ({UNITS[target]}); "
        "δH₁ = ∇H · Δθ predicts ΔH = H(θ + Δθ) − H(θ) of the next update.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *("| " + " | ".join(table_cells(p.name, p.row)) + " |" for p in probes),
        "",
        "SE: standard error (E and U batches). Parts: gradient + momentum/decay = δH₁. Naive: δH₁ without "
        "Rao-Blackwellisation/baseline. ESS/N: importance-weight effective sample size when the samples were drawn "
        "by another checkpoint. z = (δH₁ − exact) / SE_E, exact over the whole prompt population (over the drawn E "
        "prompts only, marked *, when the population is too large to enumerate). ΔH(lr): ground truth at η = lr by self-normalised "
        "importance sampling (SNIS) and by fresh samples; ratio = ΔH(lr) / δH₁ (1 = perfect prediction).",
        "",
        *_missing_note(probes),
        f"## Top entropy-lowering U groups ({last})",
        "",
        "Each group's δH₁ − δH₁ without it (leave-one-group-out, through the real update rule: clipping makes "
        "the linearised attributions ~0) where delta-h1 kept the group gradients, else the linearised share.",
        "",
    ]
    if not top:
        lines.append("No U group lowers the entropy.")
    for rank, g in enumerate(top, start=1):
        lines.append(f"{rank}. `{_text(g.prompt)}` {g.contribution:.3g} — {_text(g.responses, 120)}")
    return "\n".join(lines) + "\n"


def _missing_note(probes: list[Probe]) -> list[str]:
    """Say why a cell shows – : the checkpoint's exact or truth output was absent (not computed)."""
    absent = [f"{p.name} has no {' and no '.join(p.missing)} output" for p in probes if p.missing]
    if not absent:
        return []
    return [
        f"{DASH}: not computed. {'; '.join(absent)} (the exact and truth stages are optional: run them, e.g. "
        "`dvc repro`, to fill those columns). A – elsewhere is a value that does not apply (e.g. ESS/N for samples "
        "the checkpoint drew itself).",
        "",
    ]


# ----------------------------------------------------------------------------------------------
# plot data (DVC) and PNGs


def csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def plot_tables(probes: list[Probe], top: list[UGroup]) -> dict[str, str]:
    """CSV text of plots/delta_h1.csv (lo/hi = δH₁ ∓ 2 SE), plots/delta_h_eta.csv and plots/top_u.csv."""
    dh1 = [
        [
            p.name,
            p.row.step,
            p.row.delta_h1,
            p.row.se_delta_h1,
            p.row.delta_h1 - 2 * p.row.se_delta_h1,
            p.row.delta_h1 + 2 * p.row.se_delta_h1,
            p.row.exact_delta_h1,
        ]
        for p in probes
    ]
    eta = [[p.name, *(getattr(c, k) for k in CURVE_COLUMNS)] for p in probes for c in p.curve]
    return {
        "delta_h1.csv": csv_text(["checkpoint", "step", "delta_h1", "se", "lo", "hi", "exact"], dh1),
        "delta_h_eta.csv": csv_text(["checkpoint", *CURVE_COLUMNS], eta),
        "top_u.csv": csv_text(
            ["rank", "contribution", "prompt", "responses"],
            [[i, g.contribution, g.prompt, g.responses] for i, g in enumerate(top, start=1)],
        ),
    }


def figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same inputs, same bytes


def plot_delta_h1(probes: list[Probe], unit: str, path: Path) -> None:
    """δH₁ per checkpoint with ±2·SE error bars; exact δH₁ as markers where it was computed."""
    fig = figure(max(5.0, 1.4 * len(probes) + 2.5), 4.2)
    ax = fig.add_subplot()
    x = list(range(len(probes)))
    y = [p.row.delta_h1 for p in probes]
    ax.errorbar(
        x,
        y,
        yerr=[2 * p.row.se_delta_h1 for p in probes],
        fmt="o-",
        color="C0",
        capsize=5,
        label=r"$\delta H_1$ (sampled) $\pm$ 2 SE",
    )
    ex = [(i, p.row.exact_delta_h1) for i, p in enumerate(probes) if p.row.exact_delta_h1 is not None]
    if ex:
        ax.plot(*zip(*ex), "x", color="C3", markersize=10, markeredgewidth=2, zorder=5, label=r"exact $\delta H_1$")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [f"{p.name}\n(step {p.row.step})" for p in probes])
    ax.set_xlim(-0.5, len(probes) - 0.5)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel(rf"$\delta H_1$ ({unit})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title(r"Predicted entropy change $\delta H_1$ of the next update")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    save_png(fig, path)


def plot_delta_h_eta(probes: list[Probe], unit: str, path: Path) -> None:
    """One panel per checkpoint: ΔH(η) vs η from truth (SNIS, fresh; ±2 SE) and exact, with the δH₁ line."""
    n = len(probes)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = figure(4.6 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, probes):
        c, r = p.curve, p.row
        lr, d1, se = r.learning_rate, r.delta_h1, r.se_delta_h1
        eta_max = max([e.eta for e in c] + [lr])
        line = [0.0, eta_max]
        slope = d1 / lr if lr > 0 else 0.0  # δH₁(η) = (η/lr)·δH₁
        ax.plot(line, [0.0, slope * eta_max], "-", color="C0", label=r"$\delta H_1 \cdot \eta/\mathrm{lr}$")
        band = 2 * se / lr if lr > 0 else 0.0
        ax.fill_between(
            line,
            [0.0, (slope - band) * eta_max],
            [0.0, (slope + band) * eta_max],
            color="C0",
            alpha=0.15,
            linewidth=0,
            label=r"$\pm$ 2 SE",
        )
        truths = (("truth_snis", "o", "C1", "truth (SNIS)"), ("truth_fresh", "s", "C2", "truth (fresh)"))
        for key, fmt, color, label in truths:
            pts = [
                (e.eta, getattr(e, key), 2 * (getattr(e, f"{key}_se") or 0.0)) for e in c if getattr(e, key) is not None
            ]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    fmt=fmt,
                    color=color,
                    capsize=4,
                    markersize=5,
                    alpha=0.85,
                    label=label + r" $\pm$ 2 SE",
                )
        pts = [(e.eta, e.exact) for e in c if e.exact is not None]
        if pts:
            ax.plot(*zip(*pts), "x:", color="C3", markersize=8, markeredgewidth=2, label="exact")
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.axvline(lr, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_title(f"{p.name} (step {r.step}, lr = {lr:.3g})", fontsize="medium")
        ax.set_xlabel(r"step size $\eta$")
        ax.set_ylabel(rf"$\Delta H(\eta)$ ({unit})")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(r"Entropy change after $\theta + (\eta/\mathrm{lr})\,\Delta\theta$; dashed: $\eta$ = lr")
    save_png(fig, path)


def plot_top_u(top: list[UGroup], name: str, unit: str, path: Path) -> None:
    """Horizontal bars: the most entropy-lowering U groups (most negative at the top), labelled by prompt."""
    fig = figure(8.0, 1.6 + 0.42 * max(len(top), 1))
    ax = fig.add_subplot()
    if top:
        labels = [f"{_text(g.prompt, 24)}  {_text(g.responses, 44)}" for g in top]
        ax.barh(range(len(top)), [g.contribution for g in top], color="C0")
        ax.set_yticks(range(len(top)), labels, fontsize="small")
        ax.invert_yaxis()
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no U group lowers the entropy", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel(rf"contribution to $\delta H_1$ ({unit})")
    ax.set_title(f"Most entropy-lowering U groups — {name}\n(prompt, responses → reward)", fontsize="medium")
    save_png(fig, path)


__all__ = [
    "CurvePoint",
    "DELTA_H1_KEYS",
    "Probe",
    "UGroup",
    "UNITS",
    "csv_text",
    "figure",
    "fmt",
    "fmt_pm",
    "save_png",
    "checkpoint_probe",
    "markdown",
    "plot_delta_h1",
    "plot_delta_h_eta",
    "plot_tables",
    "plot_top_u",
    "table_cells",
    "top_u_groups",
]
