"""The `delta-h1` stage: δH₁ = X̄ · Δθ ± SE, δH₂ and attributions (docs/math.md §4–§6), by `Probe.delta_h1`.

Reads samples_e, samples_u (not for update.rule observed: the step θ(next) − θ(this) is given) and
verify's artifacts; writes delta_h1.json (`DeltaH1Report`), bars.safetensors (`Bars`) and attributions.csv.
Under torchrun every process takes a contiguous share of the rows and rank 0 writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from entropy_probe import distributed
from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.observed import next_checkpoint
from entropy_probe.params import Params
from entropy_probe.probe import Probe, require_policy_gradient
from entropy_probe.update import resolve_loss_agg_mode
from entropy_probe.update_rule import max_grad_norm_of

log = logging.getLogger(__name__)


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    observed = params.update.rule == "observed"
    E = Samples.read(params.paths.sample_e, "samples_e")
    U = None if observed else Samples.read(params.paths.sample_u, "samples_u")
    verified = VerifyReport.read(params.paths.verify)
    if U is not None:
        require_policy_gradient(U, params.update.rule)
    if dry_run:
        return _plan(params, E, U, verified, out_dir)
    probe = Probe.from_verify(params)
    result = probe.delta_h1(E, U)
    distributed.on_rank0(lambda: result.save(out_dir))  # every process holds the same result; rank 0 writes it
    estimate = result.estimate  # leave-one-group-out where kept: through clipping the linearised one is ~0
    _log_attributions(estimate.u_attribution if estimate.u_attribution_loo is None else estimate.u_attribution_loo)
    return summary_line(result.report, out_dir)


def _plan(params: Params, E: Samples, U: Samples | None, verified: VerifyReport, out_dir: Path) -> str:
    """What would be computed, from the artifacts alone (no model is loaded)."""
    head = f"delta-h1 plan: E {len(E.input_ids)} sequences, "
    tail = (
        f"target {params.estimator.entropy}, baseline {params.estimator.baseline}; checkpoint "
        f"{params.checkpoint.path}; writes {out_dir}"
    )
    if U is None:
        nxt = params.update.next_checkpoint or next_checkpoint(Path(params.checkpoint.path))
        return f"{head}no U batch; update observed (Δθ = {nxt} − checkpoint.path); {tail}"
    mode, _, _ = resolve_loss_agg_mode(params.update.loss_agg_mode, verified.trainer_config.model_dump())
    clip, _ = max_grad_norm_of(params.update.max_grad_norm, verified.max_grad_norm)
    n_groups = int(U.group_index.max()) + 1
    return (
        f"{head}U {len(U.input_ids)} sequences ({n_groups} groups of {U.meta.G}); update {params.update.rule} "
        f"({mode}, clip {clip}); {tail}"
    )


def summary_line(summary: DeltaH1Report, out_dir: Path) -> str:
    def f(x, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    so = summary.second_order
    second = "" if so is None else f"; δH₂ {so.delta_h2:.3g} ± {so.se_delta_h2:.2g} ({so.verdict})"
    if summary.observed:
        head = f"delta-h1 (observed step to {summary.update.observed.next_checkpoint}): δH₁_obs"
        return (
            f"{head} = {summary.delta_h1:.4g} ± {summary.se_delta_h1:.2g} (SE_E; the step is given), "
            f"‖Δθ_obs‖ {summary.norm_delta_theta:.3g}; entropy {summary.entropy:.4g}{second} -> {out_dir}"
        )
    return (
        f"delta-h1: δH₁ = {summary.delta_h1:.4g} ± {summary.se_delta_h1:.2g} (SE_E {summary.se_E:.2g}, SE_U "
        f"{f(summary.se_U, '.2g')}); entropy {summary.entropy:.4g}; gradient part "
        f"{summary.delta_h1_gradient_part:.4g}, momentum/decay part {summary.delta_h1_momentum_part:.4g}{second} "
        f"-> {out_dir}"
    )


def _log_attributions(attribution) -> None:
    if attribution is None:
        return
    values = attribution.tolist()
    order = sorted(range(len(values)), key=values.__getitem__)
    for what, groups in (("lowering", order[:3]), ("raising", order[::-1][:3])):
        log.info("U groups %s entropy most: %s", what, ", ".join(f"#{b} ({values[b]:.3g})" for b in groups))
