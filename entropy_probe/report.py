"""The `report` stage: one table and a few plots of δH₁ ± SE, exact δH₁ and ground-truth ΔH(η) per checkpoint.

Inputs, per probed checkpoint `name` (from `probe.checkpoints`; with an empty list, the single run in
`paths.{verify,delta_h1,exact,truth}`, named after `checkpoint.path`'s directory):

    <probe.root>/<name>/verify/verify.json          required (step, learning rate)
    <probe.root>/<name>/delta_h1/delta_h1.json      required (δH₁, SEs, parts, reuse ESS)
    <probe.root>/<name>/delta_h1/attributions.csv   required for the last checkpoint (top U groups)
    <probe.root>/<name>/exact/exact.json            optional (exact δH₁, exact ΔH(η))
    <probe.root>/<name>/truth/truth.json            optional (ΔH(η) by SNIS and by fresh samples)

Derived numbers (everything else is copied):

    z        = (δH₁ − δH₁_exact) / SE_E        exact enumerates the E prompts with Δθ fixed, so only
                                               the E batch's sampling error separates the two
    δH₁(η)   = (η / lr) · δH₁  = m · δH₁       the first-order prediction at η = m · lr
    ratio    = ΔH(lr) / δH₁                    truth over prediction at m = 1 (1 = perfect)

Outputs (all in one staged directory, so a failed run leaves nothing): report.md (also printed),
report.json (the table's numbers, keyed by checkpoint: DVC metrics), plots/*.csv (DVC plots) and PNGs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from . import files, outputs
from .errors import ProbeError
from .params import Params

log = logging.getLogger(__name__)

DASH = "–"
TOP_K = 10  # U groups shown in the "most entropy-lowering" list and plot
REL_TOL = 1e-4  # exact/truth must describe the same δH₁ run (targets' δH₁ agree with the top level to ~1e-7)
UNITS = {"sequence": "nats/sequence", "token_mean": "nats/token", "seq_mean_token_mean": "nats/token"}
DELTA_H1_KEYS = (
    "delta_h1", "se_delta_h1", "se_E", "se_U", "entropy", "learning_rate", "delta_h1_gradient_part",
    "delta_h1_momentum_part", "delta_h1_naive", "cov_logp_advantage",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class CheckpointInputs:
    """Where one probed checkpoint's stage outputs live."""

    name: str
    verify: Path  # verify.json
    delta_h1: Path  # delta_h1.json
    attributions: Path  # attributions.csv
    exact: Path  # exact.json (optional)
    truth: Path  # truth.json (optional)


def _inputs_in(name: str, verify: Path, delta_h1: Path, exact: Path, truth: Path) -> CheckpointInputs:
    return CheckpointInputs(
        name, verify / "verify.json", delta_h1 / "delta_h1.json", delta_h1 / "attributions.csv",
        exact / "exact.json", truth / "truth.json",
    )  # fmt: skip


def checkpoint_inputs(params: Params) -> list[CheckpointInputs]:
    """One entry per probed checkpoint, in `probe.checkpoints` order (the last one gets the top-U list)."""
    probes = params.probe.checkpoints
    if not probes:
        p = params.paths
        name = Path(params.checkpoint.path).name or "checkpoint"
        return [_inputs_in(name, Path(p.verify), Path(p.delta_h1), Path(p.exact), Path(p.truth))]
    names = [c.name for c in probes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ProbeError(f"probe.checkpoints names '{dup}' twice", "give every probed checkpoint its own name")
    root = Path(params.probe.root)
    return [_inputs_in(n, *(root / n / sub for sub in ("verify", "delta_h1", "exact", "truth"))) for n in names]


def _read_required(path: Path, name: str, what: str) -> dict:
    if not path.exists():
        raise ProbeError(f"checkpoint '{name}' has no {what} ({path})", "run `dvc repro` to compute it")
    return files.read_json(path, f"{what} of checkpoint '{name}'")


def _number(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ProbeError(f"{where} has no number '{key}' (got {v!r})", "rerun its stage (dvc repro)")
    return float(v)


def _opt(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _same(a: float, b, where: str, name: str, what: str) -> None:
    """Refuse an exact/truth artifact computed from a different δH₁ run (stale: dvc would rerun it)."""
    if not isinstance(b, (int, float)) or not math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-300):
        raise ProbeError(
            f"{where} of checkpoint '{name}' has {what} {b!r}, but delta_h1.json has {a!r} (stale)",
            "rerun its stage (dvc repro)",
        )


# ----------------------------------------------------------------------------------------------
# one checkpoint


@dataclass
class Probe:
    """One checkpoint's table row (numbers only, None = not available) and its ΔH(η) curve."""

    row: dict
    curve: list[dict] = field(default_factory=list)


def load_probe(inp: CheckpointInputs, default_multipliers: list[float]) -> Probe:
    """Read one checkpoint's artifacts into a table row and a ΔH(η) curve (see the module docstring)."""
    name = inp.name
    dh = _read_required(inp.delta_h1, name, "delta_h1.json")
    verify = _read_required(inp.verify, name, "verify.json")
    where = f"delta_h1.json of checkpoint '{name}'"
    row: dict = {"step": verify.get("step"), "global_step": verify.get("global_step")}
    target = (dh.get("estimator") or {}).get("entropy")
    if target not in UNITS:
        raise ProbeError(f"{where} names no known estimator.entropy (got {target!r})", "rerun delta-h1 (dvc repro)")
    row["target"] = target
    row.update({k: _number(dh, k, where) for k in DELTA_H1_KEYS})
    reuse = dh.get("reuse") or {}
    weighted = bool(reuse.get("weighted"))
    row["ess_fraction_E"] = _opt(reuse.get("ess_fraction_E")) if weighted else None
    row["ess_fraction_U"] = _opt(reuse.get("ess_fraction_U")) if weighted else None
    d1, lr = row["delta_h1"], row["learning_rate"]

    curve: dict[float, dict] = {}

    def point(m: float) -> dict:
        key = next((k for k in curve if math.isclose(k, m, rel_tol=1e-9)), m)
        return curve.setdefault(key, {"multiplier": key})

    exact = files.read_json(inp.exact, f"exact.json of checkpoint '{name}'") if inp.exact.exists() else None
    row.update(exact_delta_h1=None, exact_z=None)
    if exact is not None:
        t = (exact.get("targets") or {}).get(target)
        if not t:
            raise ProbeError(f"exact.json of checkpoint '{name}' has no target '{target}'", "rerun exact (dvc repro)")
        _same(d1, t.get("delta_h1"), "exact.json", name, "δH₁")
        ex = _number(t, "delta_h1_exact", f"exact.json of checkpoint '{name}'")
        row["exact_delta_h1"] = ex
        row["exact_z"] = _opt(t.get("z"))  # (δH₁ − exact)/SE_E, as exact computed it
        for g in t.get("eta_grid") or []:
            point(float(g["multiplier"]))["exact"] = _opt(g.get("delta_h_exact"))

    truth = files.read_json(inp.truth, f"truth.json of checkpoint '{name}'") if inp.truth.exists() else None
    for k in ("truth_snis", "truth_snis_se", "truth_snis_ess_fraction", "truth_fresh", "truth_fresh_se",
              "ratio_snis", "ratio_fresh", "truth_slope_snis", "truth_slope_fresh"):  # fmt: skip
        row[k] = None
    if truth is not None:
        if truth.get("target") != target:
            raise ProbeError(
                f"truth.json of checkpoint '{name}' is for target {truth.get('target')!r}, delta_h1.json for {target!r}",
                "rerun truth (dvc repro)",
            )
        _same(d1, truth.get("delta_h1"), "truth.json", name, "δH₁")
        _same(lr, truth.get("learning_rate"), "truth.json", name, "learning_rate")
        for e in truth.get("etas") or []:
            p = point(float(e["multiplier"]))
            snis, fresh = e.get("snis") or {}, e.get("fresh") or {}
            p.update(
                truth_snis=_opt(snis.get("delta_h")), truth_snis_se=_opt(snis.get("se")),
                truth_fresh=_opt(fresh.get("delta_h")), truth_fresh_se=_opt(fresh.get("se")),
            )  # fmt: skip
            if math.isclose(p["multiplier"], 1.0, rel_tol=1e-9):
                row.update(truth_snis=p["truth_snis"], truth_snis_se=p["truth_snis_se"],
                           truth_snis_ess_fraction=_opt(snis.get("ess_fraction")),
                           truth_fresh=p["truth_fresh"], truth_fresh_se=p["truth_fresh_se"])  # fmt: skip
        lin = truth.get("linearity") or {}
        row["truth_slope_snis"], row["truth_slope_fresh"] = _opt(lin.get("slope_snis")), _opt(lin.get("slope_fresh"))
    for kind in ("snis", "fresh"):
        dh_lr = row[f"truth_{kind}"]
        row[f"ratio_{kind}"] = dh_lr / d1 if dh_lr is not None and d1 != 0 else None

    if not curve:  # neither exact nor truth: the prediction line alone, on the truth stage's grid
        for m in default_multipliers:
            point(float(m))
    cols = ("truth_snis", "truth_snis_se", "truth_fresh", "truth_fresh_se", "exact")
    points = [
        {"multiplier": m, "eta": m * lr, "delta_h1_pred": m * d1, **{c: curve[m].get(c) for c in cols}}
        for m in sorted(curve)
    ]
    return Probe(row={"name": name, **row}, curve=points)


def top_u_groups(path: Path, name: str, k: int = TOP_K) -> list[dict]:
    """The U prompt groups with the most negative contribution to δH₁ (at most k, negatives only)."""
    if not path.exists():
        raise ProbeError(f"checkpoint '{name}' has no attributions.csv ({path})", "run `dvc repro` to compute it")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"batch", "contribution", "prompt", "responses"}
        if not need <= set(reader.fieldnames or []):
            raise ProbeError(f"{path} lacks columns {sorted(need - set(reader.fieldnames or []))}", "rerun delta-h1")
        rows = [r for r in reader if r["batch"] == "U"]
    try:
        groups = [
            {"contribution": float(r["contribution"]), "prompt": r["prompt"], "responses": r["responses"]} for r in rows
        ]
    except ValueError:
        raise ProbeError(f"{path} has a non-numeric contribution", "rerun delta-h1 (dvc repro)") from None
    lowering = sorted((g for g in groups if g["contribution"] < 0), key=lambda g: g["contribution"])[:k]
    return [{"rank": i + 1, **g} for i, g in enumerate(lowering)]


# ----------------------------------------------------------------------------------------------
# table


def _f(x, spec: str = ".3g") -> str:
    return DASH if x is None else format(x, spec)


def _pm(x, se, spec: str = ".3g") -> str:
    return DASH if x is None else f"{x:{spec}} ± {_f(se, spec)}"


def _text(s: str, limit: int = 80) -> str:
    """One line, no backticks (safe inside a markdown code span), shortened to `limit` characters."""
    s = s.replace("\n", "\\n").replace("`", "'")
    return s if len(s) <= limit else s[: limit - 1] + "…"


HEADER = (
    "checkpoint", "step", "lr", "H", "δH₁ ± SE", "gradient part", "momentum part", "naive δH₁",
    "Cov(log π, A)", "ESS/N (E, U)", "exact δH₁", "z", "ΔH(lr) SNIS ± SE", "ΔH(lr) fresh ± SE",
    "ΔH/δH₁ (SNIS, fresh)",
)  # fmt: skip


def table_cells(r: dict) -> list[str]:
    """One markdown table row; "–" where a number is not available."""
    ess = DASH if r["ess_fraction_E"] is None else f"{_f(r['ess_fraction_E'], '.2f')}, {_f(r['ess_fraction_U'], '.2f')}"
    ratio = DASH if r["ratio_snis"] is None and r["ratio_fresh"] is None else (
        f"{_f(r['ratio_snis'], '.2f')}, {_f(r['ratio_fresh'], '.2f')}"
    )
    return [
        r["name"], _f(r["step"], "d") if isinstance(r["step"], int) else _f(r["step"]), _f(r["learning_rate"]),
        _f(r["entropy"], ".4g"), _pm(r["delta_h1"], r["se_delta_h1"]), _f(r["delta_h1_gradient_part"]),
        _f(r["delta_h1_momentum_part"]), _f(r["delta_h1_naive"]), _f(r["cov_logp_advantage"]), ess,
        _f(r["exact_delta_h1"]), _f(r["exact_z"], "+.2f"), _pm(r["truth_snis"], r["truth_snis_se"]),
        _pm(r["truth_fresh"], r["truth_fresh_se"]), ratio,
    ]  # fmt: skip


def markdown(rows: list[dict], top: list[dict], last: str) -> str:
    """The report: the per-checkpoint table, a legend, and the top entropy-lowering U groups of `last`."""
    target = rows[0]["target"]
    lines = [
        "# Entropy probe report",
        "",
        f"Entropy target `{target}` ({UNITS[target]}); "
        "δH₁ = ∇H · Δθ predicts ΔH = H(θ + Δθ) − H(θ) of the next update.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|",
        *("| " + " | ".join(table_cells(r)) + " |" for r in rows),
        "",
        "SE: standard error (E and U batches). Parts: gradient + momentum/decay = δH₁. Naive: δH₁ without "
        "Rao-Blackwellisation/baseline. ESS/N: importance-weight effective sample size when the samples were drawn "
        "by another checkpoint. z = (δH₁ − exact) / SE_E. ΔH(lr): ground truth at η = lr by self-normalised "
        "importance sampling (SNIS) and by fresh samples; ratio = ΔH(lr) / δH₁ (1 = perfect prediction).",
        "",
        f"## Top entropy-lowering U groups ({last})",
        "",
    ]
    if not top:
        lines.append("No U group lowers the entropy.")
    for g in top:
        lines.append(f"{g['rank']}. `{_text(g['prompt'])}` {g['contribution']:.3g} — {_text(g['responses'], 120)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# plot data (DVC) and PNGs


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    return buf.getvalue()


def plot_tables(probes: list[Probe], top: list[dict]) -> dict[str, str]:
    """CSV text of plots/delta_h1.csv (lo/hi = δH₁ ∓ 2 SE), plots/delta_h_eta.csv and plots/top_u.csv."""
    dh1 = [
        [p.row["name"], p.row["step"], p.row["delta_h1"], p.row["se_delta_h1"],
         p.row["delta_h1"] - 2 * p.row["se_delta_h1"], p.row["delta_h1"] + 2 * p.row["se_delta_h1"],
         p.row["exact_delta_h1"]]
        for p in probes
    ]  # fmt: skip
    eta_cols = ["multiplier", "eta", "delta_h1_pred", "truth_snis", "truth_snis_se", "truth_fresh", "truth_fresh_se",
                "exact"]  # fmt: skip
    eta = [[p.row["name"], *(c[k] for k in eta_cols)] for p in probes for c in p.curve]
    return {
        "delta_h1.csv": _csv(["checkpoint", "step", "delta_h1", "se", "lo", "hi", "exact"], dh1),
        "delta_h_eta.csv": _csv(["checkpoint", *eta_cols], eta),
        "top_u.csv": _csv(["rank", "contribution", "prompt", "responses"],
                          [[g["rank"], g["contribution"], g["prompt"], g["responses"]] for g in top]),
    }  # fmt: skip


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same inputs, same bytes


def plot_delta_h1(probes: list[Probe], unit: str, path: Path) -> None:
    """δH₁ per checkpoint with ±2·SE error bars; exact δH₁ as markers where it was computed."""
    fig = _figure(max(5.0, 1.4 * len(probes) + 2.5), 4.2)
    ax = fig.add_subplot()
    x = list(range(len(probes)))
    y = [p.row["delta_h1"] for p in probes]
    ax.errorbar(x, y, yerr=[2 * p.row["se_delta_h1"] for p in probes], fmt="o-", color="C0", capsize=5,
                label=r"$\delta H_1$ (sampled) $\pm$ 2 SE")  # fmt: skip
    ex = [(i, p.row["exact_delta_h1"]) for i, p in enumerate(probes) if p.row["exact_delta_h1"] is not None]
    if ex:
        ax.plot(*zip(*ex), "x", color="C3", markersize=10, markeredgewidth=2, zorder=5, label=r"exact $\delta H_1$")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xticks(x, [f"{p.row['name']}\n(step {p.row['step']})" for p in probes])
    ax.set_xlim(-0.5, len(probes) - 0.5)
    ax.set_xlabel("checkpoint")
    ax.set_ylabel(rf"$\delta H_1$ ({unit})")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title(r"Predicted entropy change $\delta H_1$ of the next update")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


def plot_delta_h_eta(probes: list[Probe], unit: str, path: Path) -> None:
    """One panel per checkpoint: ΔH(η) vs η from truth (SNIS, fresh; ±2 SE) and exact, with the δH₁ line."""
    n = len(probes)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _figure(4.6 * ncols, 3.8 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, p in zip(axes, probes):
        c, r = p.curve, p.row
        lr, d1, se = r["learning_rate"], r["delta_h1"], r["se_delta_h1"]
        eta_max = max([e["eta"] for e in c] + [lr])
        line = [0.0, eta_max]
        slope = d1 / lr if lr > 0 else 0.0  # δH₁(η) = (η/lr)·δH₁
        ax.plot(line, [0.0, slope * eta_max], "-", color="C0", label=r"$\delta H_1 \cdot \eta/\mathrm{lr}$")
        band = 2 * se / lr if lr > 0 else 0.0
        ax.fill_between(line, [0.0, (slope - band) * eta_max], [0.0, (slope + band) * eta_max], color="C0",
                        alpha=0.15, linewidth=0, label=r"$\pm$ 2 SE")  # fmt: skip
        truths = (("truth_snis", "o", "C1", "truth (SNIS)"), ("truth_fresh", "s", "C2", "truth (fresh)"))
        for key, fmt, color, label in truths:
            pts = [(e["eta"], e[key], 2 * (e[f"{key}_se"] or 0.0)) for e in c if e[key] is not None]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, fmt=fmt, color=color, capsize=4, markersize=5, alpha=0.85,
                            label=label + r" $\pm$ 2 SE")  # fmt: skip
        pts = [(e["eta"], e["exact"]) for e in c if e["exact"] is not None]
        if pts:
            ax.plot(*zip(*pts), "x:", color="C3", markersize=8, markeredgewidth=2, label="exact")
        ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.axvline(lr, color="0.6", linewidth=0.8, linestyle="--")
        ax.set_title(f"{r['name']} (step {r['step']}, lr = {lr:.3g})", fontsize="medium")
        ax.set_xlabel(r"step size $\eta$")
        ax.set_ylabel(rf"$\Delta H(\eta)$ ({unit})")
        ax.ticklabel_format(style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(r"Entropy change after $\theta + (\eta/\mathrm{lr})\,\Delta\theta$; dashed: $\eta$ = lr")
    _save(fig, path)


def plot_top_u(top: list[dict], name: str, unit: str, path: Path) -> None:
    """Horizontal bars: the most entropy-lowering U groups (most negative at the top), labelled by prompt."""
    fig = _figure(8.0, 1.6 + 0.42 * max(len(top), 1))
    ax = fig.add_subplot()
    if top:
        labels = [f"{_text(g['prompt'], 24)}  {_text(g['responses'], 44)}" for g in top]
        ax.barh(range(len(top)), [g["contribution"] for g in top], color="C0")
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
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# the stage


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> dict | None:
    """Read every probed checkpoint's outputs; write report.md/json, plots/*.csv and PNGs into `out_dir`."""
    inputs = checkpoint_inputs(params)
    if dry_run:
        print(f"report: would read {len(inputs)} checkpoint(s) and write {out_dir}/")
        for inp in inputs:
            wanted = [("required", inp.verify), ("required", inp.delta_h1),
                     ("optional", inp.exact), ("optional", inp.truth)]  # fmt: skip
            if inp is inputs[-1]:
                wanted.insert(2, ("required", inp.attributions))
            for kind, path in wanted:
                state = "" if path.exists() else "  (missing)"
                print(f"  {inp.name}: {path} [{kind}]{state}")
        return None

    probes = [load_probe(inp, params.truth.eta_multipliers) for inp in inputs]
    targets = sorted({p.row["target"] for p in probes})
    if len(targets) > 1:
        raise ProbeError(f"the checkpoints were probed with different entropy targets {targets}",
                         "rerun delta-h1 with one estimator.entropy for all (dvc repro)")  # fmt: skip
    last = inputs[-1].name
    top = top_u_groups(inputs[-1].attributions, last)
    unit = UNITS[targets[0]]
    text = markdown([p.row for p in probes], top, last)
    rows = {p.row["name"]: {k: v for k, v in p.row.items() if k != "name"} for p in probes}
    result = {"target": targets[0], "checkpoints": rows}

    with outputs.staged_output_dir(out_dir) as tmp:
        files.write_text(tmp / "report.md", text)
        files.write_json(tmp / "report.json", result)
        for fname, body in plot_tables(probes, top).items():
            files.write_text(tmp / "plots" / fname, body)
        plot_delta_h1(probes, unit, tmp / "delta_h1_by_checkpoint.png")
        plot_delta_h_eta(probes, unit, tmp / "delta_h_vs_eta.png")
        plot_top_u(top, last, unit, tmp / "top_u.png")
    print(text, end="")
    log.info("report: wrote %s (%d checkpoints)", out_dir, len(probes))
    return result


__all__ = [
    "CheckpointInputs",
    "Probe",
    "checkpoint_inputs",
    "load_probe",
    "markdown",
    "plot_delta_h1",
    "plot_delta_h_eta",
    "plot_tables",
    "plot_top_u",
    "run",
    "table_cells",
    "top_u_groups",
]
