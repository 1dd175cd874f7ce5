"""The `whatif` stage: which U tokens move entropy, and what other updates would do, from delta-h1's X̄
(docs/math.md §12), by `Probe.whatif`.

Reads samples_e, samples_u, verify's artifacts and delta-h1's report and X̄ (bars) for the same checkpoint;
writes whatif.json (`WhatIfReport`: the what-if rows, the entropy-neutral bonus, the token summary),
tokens.csv (every U token's share a_ij of δH₁'s linearised gradient part, with the proxies) and tokens.png
(a_ij against the token's entropy), all or nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.params import Params

log = logging.getLogger(__name__)


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    E = Samples.read(params.paths.sample_e, "samples_e")
    U = Samples.read(params.paths.sample_u, "samples_u")
    report = DeltaH1Report.read(params.paths.delta_h1)
    report.check_checkpoint(
        VerifyReport.read(params.paths.verify).fingerprint,
        f"{params.paths.verify} describes",
        "point paths.delta_h1 and paths.verify at the same checkpoint's outputs (dvc repro)",
    )
    rows = params.whatif.rows
    if dry_run:
        changed = sum(1 for r in rows if r.model_dump(exclude={"name", "lr_scale", "max_grad_norm"}, exclude_none=True))
        return (
            f"whatif plan: {len(rows)} rows ({changed} with one more U backward each), the entropy-neutral bonus "
            f"(one U backward), the token pass (one double backward over U's {len(U.input_ids)} sequences) and one "
            f"E backward over {len(E.input_ids)} sequences for every SE_E; X̄ from {params.paths.delta_h1}; "
            f"writes {out_dir}"
        )
    from entropy_probe.probe import DeltaH1Result, Probe

    probe = Probe.from_verify(params)
    result = probe.whatif(E, U, DeltaH1Result.read(params.paths.delta_h1))
    result.save(out_dir)
    for line in describe(result.report):
        log.info("%s", line)
    n = result.report.entropy_neutral
    neutral = "none found" if n.entropy_coef is None else f"{n.entropy_coef:.3g} ± {n.entropy_coef_se:.2g}"
    return (
        f"whatif: δH₁ {result.report.configured.delta_h1:.4g} under {result.report.update}; {len(rows)} rows; "
        f"entropy-neutral bonus β_H* {neutral} -> {out_dir}"
    )


def describe(report) -> list[str]:
    """The what-if table and the token summary as log lines."""
    lines = [f"{'update':<40} {'δH₁':>11} {'± SE':>9} {'× configured':>13}"]
    for row in [report.configured, *report.rows]:
        ratio = "" if row.ratio is None else f"{row.ratio:13.3g}"
        lines.append(f"{row.name:<40} {row.delta_h1:11.4g} {row.se_delta_h1:9.2g} {ratio}")
    t = report.tokens
    lines.append(
        f"tokens: Σ a = {t.sum_a:.4g} (u·g {t.gradient_part_linearised:.4g}) over {t.n_tokens}; the top "
        f"{t.forking_fraction:.0%} by entropy carry {_share(t.forking_share)} ({_share(t.forking_magnitude_share)} of "
        f"Σ|a|), the top {t.clip_cov_fraction:.0%} by covariance {_share(t.clip_cov_share)} "
        f"({_share(t.clip_cov_magnitude_share)} of Σ|a|); rank correlation with Cui's covariance {_num(t.spearman_cov)}, "
        f"with the single-logit proxy {_num(t.spearman_logit)}"
    )
    return lines


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"
