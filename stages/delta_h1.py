"""The `delta-h1` stage: δH₁ = X̄ · Δθ from the E and U samples and verify's AdamW state (docs/math.md §4–§5).

Reads samples_e, samples_u and verify's report and optimizer state; loads the checkpoint verify described;
re-weights samples another checkpoint drew (`probe.reuse_weights`); runs `probe.compute_delta_h1`; writes
delta_h1.json (`DeltaH1Report`), bars.safetensors (`Bars`) and attributions.csv. Under torchrun every
process takes a contiguous share of the rows and rank 0 writes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from entropy_probe import distributed
from entropy_probe.artifacts.delta_h1 import ATTRIBUTIONS_FILE, Bars, DeltaH1Report, ReuseRecord, attributions_csv
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport, read_verify
from entropy_probe.errors import ProbeError
from entropy_probe.files import write_text
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.probe import UpdateSpec, compute_delta_h1, reuse_weights
from entropy_probe.scoring import Batch
from entropy_probe.update import FlatLayout, resolve_loss_agg_mode

log = logging.getLogger(__name__)

HF_DEFAULT_MAX_GRAD_NORM = 1.0  # transformers.TrainingArguments.max_grad_norm


def _max_grad_norm(setting, report: VerifyReport) -> tuple[float | None, str]:
    """(max_grad_norm, where it came from): `auto` takes the trainer's, else the HF Trainer default."""
    if setting != "auto":
        return setting, "update.max_grad_norm"
    if report.max_grad_norm is not None:
        return report.max_grad_norm, "the trainer's max_grad_norm"
    return HF_DEFAULT_MAX_GRAD_NORM, (
        f"default {HF_DEFAULT_MAX_GRAD_NORM} (the trainer's is not recorded: set update.max_grad_norm, write "
        "trainer_config.json beside the checkpoint, or set checkpoint.trust_pickles for a checkpoint you trust)"
    )


def _foreign(samples: dict[str, Samples], fingerprint: str, params: Params) -> dict[str, str]:
    """{"E"/"U": sampler fingerprint} for the batches another policy drew: another checkpoint, or the same
    files loaded another way (4-bit, another dtype), which is a slightly different policy."""
    load = {"dtype": params.checkpoint.dtype, "use_qlora": params.checkpoint.use_qlora}
    return {
        name: s.meta.checkpoint_fingerprint
        for name, s in samples.items()
        if s.meta.checkpoint_fingerprint != fingerprint or s.meta.load.model_dump() != load
    }


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    from entropy_probe.checkpoint import checkpoint_fingerprint, load_policy_model, load_tokenizer, resolve_paths

    E_s, U_s = Samples.read(params.paths.sample_e, "samples_e"), Samples.read(params.paths.sample_u, "samples_u")
    samples = {"E": E_s, "U": U_s}
    report, opt = read_verify(params.paths.verify)
    trainer = report.trainer_config.model_dump()
    mode, max_len, why = resolve_loss_agg_mode(params.update.loss_agg_mode, trainer)
    max_grad_norm, clip_source = _max_grad_norm(params.update.max_grad_norm, report)
    log.info("delta-h1: gradient clipping at %s from %s", max_grad_norm, clip_source)
    if not U_s.advantages.any():
        raise ProbeError(
            "every U group has all-equal rewards (all advantages are 0), so the update has no policy gradient",
            "sample more or harder U prompts (batch_config.B_U, batch_config.G), or check the reward function",
        )
    n_groups = int(U_s.group_index.max()) + 1
    log.info(
        "delta-h1: E %d sequences, U %d sequences (%d groups); target %s, baseline %s; rule %s, loss %s (%s)",
        len(E_s.input_ids),
        len(U_s.input_ids),
        n_groups,
        params.estimator.entropy,
        params.estimator.baseline,
        params.update.rule,
        mode,
        why,
    )
    if dry_run:  # the plan: what would be computed, from the artifacts alone (no model is loaded)
        return (
            f"delta-h1 plan: E {len(E_s.input_ids)} sequences, U {len(U_s.input_ids)} sequences ({n_groups} "
            f"groups of {U_s.meta.G}); target {params.estimator.entropy}, baseline {params.estimator.baseline}; "
            f"update {params.update.rule} ({mode}, clip {max_grad_norm}); checkpoint {params.checkpoint.path}; "
            f"writes {out_dir}"
        )
    if trainer.get("beta"):
        log.warning(
            "delta-h1: the trainer used a KL penalty (beta=%s); J here is the policy-gradient term only",
            trainer["beta"],
        )

    start = time.perf_counter()
    paths = resolve_paths(params.checkpoint)
    fingerprint = report.fingerprint
    if checkpoint_fingerprint(paths) != fingerprint:
        raise ProbeError(
            f"checkpoint.path {params.checkpoint.path} is not the checkpoint verify described ({fingerprint})",
            "rerun the verify stage for this checkpoint (dvc repro)",
        )
    model = load_policy_model(params.checkpoint, paths)
    tokenizer = load_tokenizer(paths)
    for s in samples.values():
        s.check_fits_model(model, tokenizer)
    log.info("delta-h1: model loaded in %.1f s", time.perf_counter() - start)
    device = next(model.parameters()).device
    E, U = Batch.from_samples(E_s, device), Batch.from_samples(U_s, device)
    world = distributed.world_size()
    if world > 1:  # torchrun: every process scores its contiguous share of E and of U; sums are all-reduced
        E.shard = distributed.row_slice(len(E), distributed.rank(), world)
        U.shard = distributed.row_slice(len(U), distributed.rank(), world)
        log.info(
            "delta-h1: rank %d of %d: E rows %d..%d, U rows %d..%d",
            distributed.rank(),
            world,
            E.shard.start,
            E.shard.stop - 1,
            U.shard.start,
            U.shard.stop - 1,
        )
    max_tokens = params.compute.max_tokens_per_microbatch
    foreign = _foreign(samples, fingerprint, params)
    reuse = reuse_weights(model, E, U, foreign, max_tokens, params.reuse.min_ess_fraction, params.reuse.force)

    named = dict(model.named_parameters())
    layout = FlatLayout.from_named(named, opt.names)
    # "next" keeps each param group's own lr; "last" or a number applies one lr to every group
    lr = None if report.learning_rate_setting == "next" else report.learning_rate
    state = opt.flat(layout, {n: named[n].detach() for n in opt.names}, lr)
    spec = UpdateSpec(params.update.rule, state, max_grad_norm, mode, max_len)
    result = compute_delta_h1(model, E, U, layout, spec, params.estimator, max_tokens, reuse.e_weights, reuse.u_weights)
    log.info("delta-h1: phase seconds %s", result.pop("timings"))

    summary = DeltaH1Report(
        **{k: v for k, v in result.items() if k not in ("xbar", "delta_theta", "e_contributions", "u_attribution")},
        B_E=len(E),
        B_U=n_groups,
        G=U_s.meta.G,
        n_E_tokens=int(E.mask.sum()),
        n_U_tokens=int(U.mask.sum()),
        estimator=params.estimator.model_dump(),
        update={
            "rule": spec.rule,
            "loss_agg_mode": mode,
            "loss_agg_reason": why,
            "max_len": max_len,
            "max_grad_norm": max_grad_norm,
            "max_grad_norm_source": clip_source,
        },
        checkpoint_fingerprint=fingerprint,
        reuse=ReuseRecord.of(
            {k: s.meta.checkpoint_fingerprint for k, s in samples.items()},
            {k: len(s.input_ids) for k, s in samples.items()},
            reuse.ess,
        ),
        world_size=world,
    )
    bars = Bars(
        layout.unflatten(result["xbar"]),
        layout.unflatten(result["delta_theta"]),
        summary.learning_rate,
        params.estimator.entropy,
    )
    u_attribution, e_contribution = result["u_attribution"].tolist(), result["e_contributions"].tolist()

    def write() -> None:  # every process holds the same results now; rank 0 writes them
        with staged_output_dir(out_dir) as tmp:
            bars.write(tmp)
            summary.write(tmp)
            write_text(tmp / ATTRIBUTIONS_FILE, attributions_csv(u_attribution, e_contribution, U_s, E_s, tokenizer))

    distributed.on_rank0(write)  # an error there is raised on every rank
    _log_attributions(u_attribution)
    return (
        f"delta-h1: δH₁ = {summary.delta_h1:.4g} ± {summary.se_delta_h1:.2g} (SE_E {summary.se_E:.2g}, SE_U "
        f"{summary.se_U:.2g}); entropy {summary.entropy:.4g}; gradient part {summary.delta_h1_gradient_part:.4g}, "
        f"momentum/decay part {summary.delta_h1_momentum_part:.4g} -> {out_dir}"
    )


def _log_attributions(attribution: list[float]) -> None:
    order = sorted(range(len(attribution)), key=attribution.__getitem__)
    for what, groups in (("lowering", order[:3]), ("raising", order[::-1][:3])):
        log.info("U groups %s entropy most: %s", what, ", ".join(f"#{b} ({attribution[b]:.3g})" for b in groups))
