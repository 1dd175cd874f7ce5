"""`WhatIfResult`: the whatif stage's artifacts (whatif.json, tokens.csv) built from a `whatif.WhatIfOutcome`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts.whatif import (
    TOKENS_FILE,
    EntropyNeutralRecord,
    TokenRecord,
    TokenSummary,
    WhatIfReport,
    WhatIfRowRecord,
    tokens_csv,
)
from .files import write_text
from .outputs import staged_output_dir
from .reporting import figure, save_png
from .tokens import TokenTable, spearman
from .whatif import RowOutcome, WhatIfOutcome

PLOT_FILE = "tokens.png"
LOW_ENTROPY = 0.01  # nats: the "confident" tokens of the 80/20 analysis


@dataclass
class WhatIfResult:
    report: WhatIfReport
    tokens_csv: str
    outcome: WhatIfOutcome | None  # None for a result read from files
    table: TokenTable | None = None

    @classmethod
    def read(cls, directory: str | Path) -> WhatIfResult:
        return cls(WhatIfReport.read(directory), (Path(directory) / TOKENS_FILE).read_text(), None)

    def save(self, directory: str | Path) -> None:
        """Write whatif.json, tokens.csv and (with the token table at hand) tokens.png into `directory`, all or
        nothing."""
        with staged_output_dir(directory) as tmp:
            self.report.write(tmp)
            write_text(tmp / TOKENS_FILE, self.tokens_csv)
            if self.table is not None:
                plot_tokens(self.table, self.report, tmp / PLOT_FILE)


def plot_tokens(table: TokenTable, report: WhatIfReport, path: Path) -> None:
    """Left: every U token's share a_ij of δH₁ against its entropy H_ij (forking and Clip-Cov tokens marked).
    Right: δH₁ ± SE of the configured update, each what-if row and the entropy-neutral bonus."""
    fig = figure(11.0, 4.2)
    ax, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    entropy, a = table.entropy.numpy(), table.a.numpy()
    plain = ~(table.forking | table.clip_cov).numpy()
    ax.scatter(entropy[plain], a[plain], s=10, color="0.55", label="other tokens")
    ax.scatter(entropy[table.forking.numpy()], a[table.forking.numpy()], s=14, color="C1", label="forking (top H)")
    clip = table.clip_cov.numpy()
    ax.scatter(entropy[clip], a[clip], s=40, facecolors="none", edgecolors="C3", label="Clip-Cov (top cov)")
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("entropy H of the policy at the token (nats)")
    ax.set_ylabel(r"token's share $a_t$ of $\delta H_1$ (nats/token)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.legend(fontsize="small")
    t = report.tokens
    ax.set_title(
        f"U tokens: the top {t.forking_fraction:.0%} by H carry {_percent(t.forking_share)} of Σa, "
        f"{_percent(t.forking_magnitude_share)} of Σ|a|",
        fontsize="medium",
    )
    rows = [report.configured, *report.rows]
    n = report.entropy_neutral
    labels = [r.name for r in rows]
    values, errors = [r.delta_h1 for r in rows], [r.se_delta_h1 for r in rows]
    if n.entropy_coef is not None:
        labels.append(f"entropy bonus β*={n.entropy_coef:.3g}")
        values.append(n.delta_h1_at)
        errors.append(n.se_at)
    bars.barh(range(len(values)), values, xerr=errors, color=["C0"] + ["C2"] * (len(values) - 1), capsize=2)
    bars.set_yticks(range(len(values)), labels, fontsize="small")
    bars.invert_yaxis()
    bars.axvline(0.0, color="0.3", linewidth=0.8)
    bars.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
    bars.set_xlabel(r"$\delta H_1$ ± SE (nats/token)")
    bars.set_title("What if the update were …", fontsize="medium")
    save_png(fig, path)


def whatif_markdown(report: WhatIfReport, name: str) -> str:
    """The report's section on one checkpoint's whatif.json: the what-if table, the entropy-neutral bonus and
    where δH₁'s gradient part sits among U's tokens."""
    lines = [
        f"## What if the update were different ({name})",
        "",
        f"Configured: {report.update}. Each row: δH₁ = X̄·Δθ' for the changed update on the same samples "
        "(SE_E and SE_U through the row's own rule).",
        "",
        "| update | changes | δH₁ | ± SE | × configured |",
        "|---|---|---:|---:|---:|",
    ]
    for row in [report.configured, *report.rows]:
        changes = ", ".join(f"{k}={v}" for k, v in row.changes.items()) or "–"
        ratio = "–" if row.ratio is None else f"{row.ratio:.3g}"
        lines.append(f"| {row.name} | {changes} | {row.delta_h1:.3g} | {row.se_delta_h1:.2g} | {ratio} |")
    n, t = report.entropy_neutral, report.tokens
    if n.entropy_coef is None:
        neutral = f"no entropy bonus reaches δH₁ = {n.target:g}"
    else:
        neutral = (
            f"an entropy bonus β_H = {n.entropy_coef:.3g} ± {n.entropy_coef_se:.2g} gives δH₁ = {n.target:g} "
            f"(± {n.se_at:.2g})"
        )
    lines += [
        "",
        f"Entropy-neutral: {neutral}; {_lr_sentence(n.lr_scale, n.target)}.",
        "",
        f"Tokens: δH₁'s linearised gradient part u·g = {t.gradient_part_linearised:.3g} = Σ a over {t.n_tokens} U "
        f"tokens. The top {t.forking_fraction:.0%} by entropy (forking tokens) carry {_percent(t.forking_share)} of "
        f"it ({_percent(t.forking_magnitude_share)} of Σ|a|), the top {t.clip_cov_fraction:.0%} by Cui's covariance "
        f"{_percent(t.clip_cov_share)} ({_percent(t.clip_cov_magnitude_share)} of Σ|a|; a share of Σ a is n/a when "
        "clipping binds: then u·g ≈ 0); "
        f"{t.low_entropy_fraction:.0%} of the tokens have H < {LOW_ENTROPY:g}. Rank correlation of a with the "
        f"covariance term {_signed(t.spearman_cov)} (negative expected), with the single-logit proxy "
        f"{_signed(t.spearman_logit)}. Most entropy-lowering tokens:",
        "",
    ]
    lines += [f"- row {r.row} pos {r.position} `{r.token!r}`: a = {r.a:.3g} (H {r.entropy:.2f})" for r in t.lowering]
    return "\n".join(lines) + "\n"


def _lr_sentence(lr_scale: float | None, target: float) -> str:
    """δH₁ is proportional to the lr (every rule here scales Δθ by it): what that means for the target."""
    if target == 0:
        return "δH₁ scales with the lr, so no lr > 0 changes its sign"
    if lr_scale is None:
        return f"δH₁ scales with the lr and has the other sign than {target:g}: no lr reaches it"
    return f"δH₁ scales with the lr: {lr_scale:.3g} × the lr reaches {target:g}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _row(outcome: RowOutcome, base: RowOutcome) -> WhatIfRowRecord:
    delta, base_delta = outcome.delta_theta.double(), base.delta_theta.double()
    norms = float(delta.norm() * base_delta.norm())
    return WhatIfRowRecord(
        name=outcome.name,
        changes=outcome.changes,
        delta_h1=outcome.delta_h1,
        se_delta_h1=outcome.se,
        se_E=outcome.se_E,
        se_U=outcome.se_U,
        ratio=None if base.delta_h1 == 0 else outcome.delta_h1 / base.delta_h1,
        cosine=None if norms == 0 else float(delta @ base_delta) / norms,
    )


def token_summary(table: TokenTable, linear: float, spec, token_text: list[str]) -> TokenSummary:
    """The per-token numbers of whatif.json (spec: params `whatif`)."""
    lowering = [
        TokenRecord(
            row=int(table.row[t]),
            position=int(table.position[t]),
            token=token_text[t],
            a=float(table.a[t]),
            entropy=float(table.entropy[t]),
            cov=float(table.cov[t]),
        )
        for t in table.lowering(spec.top_tokens).tolist()
    ]
    return TokenSummary(
        n_tokens=len(table),
        sum_a=float(table.a.sum()),
        gradient_part_linearised=linear,
        forking_fraction=spec.forking_fraction,
        forking_share=table.share(table.forking),
        forking_magnitude_share=table.magnitude_share(table.forking),
        clip_cov_fraction=spec.clip_cov_fraction,
        clip_cov_share=table.share(table.clip_cov),
        clip_cov_magnitude_share=table.magnitude_share(table.clip_cov),
        spearman_cov=spearman(table.a, table.cov),
        spearman_logit=spearman(table.a, table.logit_proxy),
        low_entropy_fraction=float((table.entropy < LOW_ENTROPY).double().mean()) if len(table) else 0.0,
        lowering=lowering,
    )


def build(outcome: WhatIfOutcome, U, tokenizer, spec, fingerprint: str, update_words: str) -> WhatIfResult:
    """whatif.json and tokens.csv from the computation (U: the samples_u artifact)."""
    tensors = U.tensors()
    table = TokenTable.of(
        outcome.token_a.cpu(),
        outcome.token_coefficients.cpu(),
        tensors,
        U.response_mask(),
        outcome.token_entropies.cpu(),
        spec.forking_fraction,
        spec.clip_cov_fraction,
    )
    token_text = [tokenizer.decode([int(t)]) for t in table.token_id.tolist()]
    group = U.group_index[table.row].tolist()
    base = outcome.base
    n = outcome.neutral
    neutral = EntropyNeutralRecord(
        target=n.target,
        entropy_coef=n.entropy_coef,
        entropy_coef_se=n.entropy_coef_se,
        delta_h1_at=None if n.at_solution is None else n.at_solution.delta_h1,
        se_at=None if n.at_solution is None else n.at_solution.se,
        lr_scale=n.lr_scale,
    )
    report = WhatIfReport(
        checkpoint_fingerprint=fingerprint,
        update=update_words,
        configured=_row(base, base),
        rows=[_row(r, base) for r in outcome.rows],
        entropy_neutral=neutral,
        tokens=token_summary(table, outcome.gradient_part_linearised, spec, token_text),
    )
    return WhatIfResult(report, tokens_csv(table, token_text, group), outcome, table)


__all__ = ["WhatIfResult", "build", "plot_tokens", "token_summary", "whatif_markdown"]
