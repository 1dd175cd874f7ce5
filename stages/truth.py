"""The `truth` stage: ground-truth ΔH(η) on the truth.eta_multipliers grid (docs/math.md §8).

Reads the E samples, delta-h1's report and Δθ (bars); loads the checkpoint delta-h1 probed; estimates ΔH(η)
by SNIS over E and, with truth.fresh_samples, by fresh samples (`ground_truth.estimate_truth`); writes
truth.json (`TruthReport`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.truth import TruthReport
from entropy_probe.ground_truth import check_multipliers
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.policy import token_budget_slices

log = logging.getLogger(__name__)


def _plan(params: Params, samples: Samples, out_dir) -> str:
    ms = check_multipliers(params.truth.eta_multipliers)
    n, n_cols = samples.input_ids.shape
    n_mb = len(token_budget_slices(n, n_cols, params.compute.max_tokens_per_microbatch))
    dh1_dir = params.paths.delta_h1
    lr = DeltaH1Report.read(dh1_dir).learning_rate if DeltaH1Report.path(dh1_dir).exists() else None
    etas = ", ".join(f"{m:g}" + ("" if lr is None else f" ({m * lr:.3g})") for m in ms)
    fresh = (
        f"fresh samples: {len(ms) + 1} generate passes of {n} sequences (θ and each θ'; seed {params.truth.seed}, "
        f"batches of <= {params.generation.gen_batch_size})"
        if params.truth.fresh_samples
        else "fresh samples: off"
    )
    return (
        f"truth plan: η = m·lr for m in [{etas}]{'' if lr is not None else ' (lr from delta-h1, not computed yet)'}; "
        f"{n} E sequences (drawn by {samples.meta.checkpoint_fingerprint}); "
        f"SNIS: {len(ms) + 1} teacher-forcing passes of {n_mb} microbatches each; {fresh}; output {out_dir}"
    )


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Ground-truth ΔH(η) on the truth.eta_multipliers grid; writes `out_dir/truth.json`."""
    samples = Samples.read(params.paths.sample_e, "samples_e")
    if dry_run:
        return _plan(params, samples, out_dir)
    from entropy_probe.probe import DeltaH1Result, Probe

    estimate = DeltaH1Result.read(params.paths.delta_h1)
    out = Probe.policy(params).truth(samples, estimate)
    with staged_output_dir(out_dir) as tmp:
        out.write(tmp)
    for e in out.etas:
        fr = "" if e.fresh is None else f", fresh {e.fresh.delta_h:+.3e} ± {e.fresh.se or 0:.1e}"
        ratio = "n/a" if e.ratio_snis is None else f"{e.ratio_snis:.3f}"
        log.info(
            "%s η = %g·lr: δH₁ pred %+.3e; SNIS %+.3e ± %.1e (ratio %s, ESS/N %.3f)%s",
            out.target,
            e.multiplier,
            e.delta_h1_pred,
            e.snis.delta_h,
            e.snis.se or 0,
            ratio,
            e.snis.ess_fraction,
            fr,
        )
    points = "; ".join(f"m={e.multiplier:g}: {e.snis.delta_h:+.3e} (pred {e.delta_h1_pred:+.3e})" for e in out.etas)
    return f"truth: {out.target} ΔH(m·lr) by SNIS {points} -> {Path(out_dir) / TruthReport.FILE}"
