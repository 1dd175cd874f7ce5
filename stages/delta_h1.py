"""The `delta-h1` stage: δH₁ = X̄ · Δθ from the E and U samples and verify's AdamW state (docs/math.md §4–§5).

Reads samples_e, samples_u and verify's report and optimizer state; loads the checkpoint verify described;
re-weights samples another checkpoint drew (`probe.reuse_weights`); runs `probe.compute_delta_h1` and
`second_order.second_order` (δH₂ along the same Δθ, docs/math.md §5.6); writes delta_h1.json
(`DeltaH1Report`), bars.safetensors (`Bars`) and attributions.csv. Under torchrun every process takes a
contiguous share of the rows and rank 0 writes.

With update.rule `observed` Δθ is the trainer's own step, θ(next checkpoint) − θ(checkpoint.path)
(`observed.observed_delta_theta`, docs/math.md §4.8): no U batch is read (samples_u need not exist) and
δH₁_obs = X̄ · Δθ_obs has SE_E only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from entropy_probe import distributed
from entropy_probe.artifacts.delta_h1 import (
    ATTRIBUTIONS_FILE,
    Bars,
    DeltaH1Report,
    ObservedRecord,
    ReuseRecord,
    SecondOrderRecord,
    attributions_csv,
)
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport, read_verify
from entropy_probe.checkpoint import CheckpointPaths
from entropy_probe.errors import ProbeError
from entropy_probe.files import write_text
from entropy_probe.observed import adapter_parameter_names, checkpoint_number, next_checkpoint, observed_delta_theta
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params
from entropy_probe.probe import UpdateSpec, compute_delta_h1, reuse_weights
from entropy_probe.scoring import Batch
from entropy_probe.second_order import second_order
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


@dataclasses.dataclass
class _Emulated:
    """How the emulated rules (adam_step, adam_precond, sgd) turn U's gradient into Δθ."""

    mode: str
    max_len: int | None
    why: str
    max_grad_norm: float | None
    clip_source: str

    def record(self, rule: str) -> dict:
        return {
            "rule": rule,
            "loss_agg_mode": self.mode,
            "loss_agg_reason": self.why,
            "max_len": self.max_len,
            "max_grad_norm": self.max_grad_norm,
            "max_grad_norm_source": self.clip_source,
        }


def _emulated(params: Params, report: VerifyReport, U_s: Samples) -> _Emulated:
    trainer = report.trainer_config.model_dump()
    mode, max_len, why = resolve_loss_agg_mode(params.update.loss_agg_mode, trainer)
    max_grad_norm, clip_source = _max_grad_norm(params.update.max_grad_norm, report)
    log.info("delta-h1: gradient clipping at %s from %s", max_grad_norm, clip_source)
    if not U_s.advantages.any():
        raise ProbeError(
            "every U group has all-equal rewards (all advantages are 0), so the update has no policy gradient",
            "sample more or harder U prompts (batch_config.B_U, batch_config.G), or check the reward function",
        )
    return _Emulated(mode, max_len, why, max_grad_norm, clip_source)


def _next_paths(params: Params) -> CheckpointPaths:
    """The files of the checkpoint after checkpoint.path (update.next_checkpoint, else the run's next
    checkpoint-N), loaded with the same settings."""
    from entropy_probe.checkpoint import resolve_paths

    given = params.update.next_checkpoint
    next_dir = Path(given) if given is not None else next_checkpoint(Path(params.checkpoint.path))
    ck = params.checkpoint.model_copy(update={"path": str(next_dir), "optimizer_path": None})
    try:
        return resolve_paths(ck)
    except ProbeError as exc:
        raise ProbeError(f"next checkpoint {next_dir} (update.next_checkpoint): {exc}") from None


def _observed_record(next_paths: CheckpointPaths, this_paths: CheckpointPaths, delta_theta) -> ObservedRecord:
    from entropy_probe.checkpoint import checkpoint_fingerprint

    step = checkpoint_number(this_paths.adapter_dir)
    next_step = checkpoint_number(next_paths.adapter_dir)
    if step is not None and next_step is not None and next_step - step > 1:
        log.warning(
            "delta-h1: %s is %d trainer steps after %s: Δθ_obs is their sum, not one step",
            next_paths.adapter_dir.name,
            next_step - step,
            this_paths.adapter_dir.name,
        )
    return ObservedRecord(
        next_checkpoint=str(next_paths.adapter_dir),
        next_checkpoint_fingerprint=checkpoint_fingerprint(next_paths),
        step=step,
        next_step=next_step,
        norm_delta_theta_obs=float(delta_theta.norm()),
    )


def _plan(params: Params, E_s: Samples, U_s: Samples | None, setup, out_dir: Path) -> str:
    """The dry-run summary: what would be computed, from the artifacts alone (no model is loaded)."""
    head = f"delta-h1 plan: E {len(E_s.input_ids)} sequences, "
    tail = (
        f"target {params.estimator.entropy}, baseline {params.estimator.baseline}; checkpoint "
        f"{params.checkpoint.path}; writes {out_dir}"
    )
    if U_s is None:
        return f"{head}no U batch; update observed (Δθ = {setup.adapter_dir} − checkpoint.path); {tail}"
    n_groups = int(U_s.group_index.max()) + 1
    return (
        f"{head}U {len(U_s.input_ids)} sequences ({n_groups} groups of {U_s.meta.G}); update {params.update.rule} "
        f"({setup.mode}, clip {setup.max_grad_norm}); {tail}"
    )


def _second_order(params: Params, model, E: Batch, layout: FlatLayout, delta_theta, lr: float, e_weights):
    """δH₂ ± SE along the same Δθ and the linear regime's η* (docs/math.md §5.6), for every update rule."""
    settings = params.second_order
    result = second_order(
        model,
        E,
        layout,
        delta_theta,
        params.estimator,
        params.compute.max_tokens_per_microbatch,
        lr=lr,
        fd_eps=settings.fd_eps,
        fraction=settings.fraction,
        e_weights=e_weights,
        z_resolve=settings.z_resolve,
    )
    return SecondOrderRecord(**dataclasses.asdict(result))


def _compute(params: Params, model, E: Batch, U: Batch | None, layout: FlatLayout, state, setup, paths, reuse):
    """(compute_delta_h1's result, delta_h1.json's `update`): Δθ emulated from U by the rule, or observed."""
    max_tokens = params.compute.max_tokens_per_microbatch
    options = dict(all_targets=params.compute.all_targets, u_cache_mb=params.compute.u_gradient_cache_mb)
    if U is not None:
        spec = UpdateSpec(params.update.rule, state, setup.max_grad_norm, setup.mode, setup.max_len)
        result = compute_delta_h1(
            model, E, U, layout, spec, params.estimator, max_tokens, reuse.e_weights, reuse.u_weights, **options
        )
        return result, setup.record(spec.rule)
    delta_obs = observed_delta_theta(paths.adapter_dir, setup.adapter_dir, layout, adapter_parameter_names(model))
    result = compute_delta_h1(
        model, E, None, layout, None, params.estimator, max_tokens, reuse.e_weights, delta_theta=delta_obs, **options
    )
    # lr: the one the trainer's optimizer held for this step (its next lr), as for the emulated rules
    lr = float(state.lr.mean())
    result.update(learning_rate=lr, bars_dot=result["delta_h1"] / lr)
    return result, {"rule": "observed", "observed": _observed_record(setup, paths, delta_obs)}


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    from entropy_probe.checkpoint import checkpoint_fingerprint, load_policy_model, load_tokenizer, resolve_paths

    observed = params.update.rule == "observed"
    E_s = Samples.read(params.paths.sample_e, "samples_e")
    U_s = None if observed else Samples.read(params.paths.sample_u, "samples_u")  # observed: the step is given
    samples = {"E": E_s} if U_s is None else {"E": E_s, "U": U_s}
    report, opt = read_verify(params.paths.verify)
    setup = _next_paths(params) if observed else _emulated(params, report, U_s)
    log.info(
        "delta-h1: E %d sequences, %s; target %s, baseline %s; rule %s",
        len(E_s.input_ids),
        "no U batch" if U_s is None else f"U {len(U_s.input_ids)} sequences ({int(U_s.group_index.max()) + 1} groups)",
        params.estimator.entropy,
        params.estimator.baseline,
        params.update.rule,
    )
    if dry_run:
        return _plan(params, E_s, U_s, setup, out_dir)
    if not observed and report.trainer_config.beta:
        log.warning(
            "delta-h1: the trainer used a KL penalty (beta=%s); J here is the policy-gradient term only",
            report.trainer_config.beta,
        )

    start = time.perf_counter()
    paths = resolve_paths(params.checkpoint)
    fingerprint = report.fingerprint
    if checkpoint_fingerprint(paths) != fingerprint:
        raise ProbeError(
            f"checkpoint.path {params.checkpoint.path} is not the checkpoint verify described ({fingerprint})",
            "rerun the verify stage for this checkpoint (dvc repro)",
        )
    if observed and setup.adapter_dir.resolve() == paths.adapter_dir.resolve():
        raise ProbeError(
            f"update.next_checkpoint {setup.adapter_dir} is checkpoint.path itself", "name the checkpoint after it"
        )
    model = load_policy_model(params.checkpoint, paths)
    tokenizer = load_tokenizer(paths)
    for s in samples.values():
        s.check_fits_model(model, tokenizer)
    log.info("delta-h1: model loaded in %.1f s", time.perf_counter() - start)
    device = next(model.parameters()).device
    chunk_mb = params.compute.logits_chunk_mb
    E = Batch.from_samples(E_s, device, chunk_mb)
    U = None if U_s is None else Batch.from_samples(U_s, device, chunk_mb)
    world = distributed.world_size()
    if world > 1:  # torchrun: every process scores its contiguous share of E and of U; sums are all-reduced
        E.shard = distributed.row_slice(len(E), distributed.rank(), world)
        log.info("delta-h1: rank %d of %d: E rows %d..%d", distributed.rank(), world, E.shard.start, E.shard.stop - 1)
        if U is not None:
            U.shard = distributed.row_slice(len(U), distributed.rank(), world)
            log.info("delta-h1: rank %d: U rows %d..%d", distributed.rank(), U.shard.start, U.shard.stop - 1)
    max_tokens = params.compute.max_tokens_per_microbatch
    foreign = _foreign(samples, fingerprint, params)
    reuse = reuse_weights(model, E, U, foreign, max_tokens, params.reuse.min_ess_fraction, params.reuse.force)

    named = dict(model.named_parameters())
    layout = FlatLayout.from_named(named, opt.names)
    # "next" keeps each param group's own lr; "last" or a number applies one lr to every group
    lr = None if report.learning_rate_setting == "next" else report.learning_rate
    state = opt.flat(layout, {n: named[n].detach() for n in opt.names}, lr)
    result, update = _compute(params, model, E, U, layout, state, setup, paths, reuse)
    log.info("delta-h1: phase seconds %s", result.pop("timings"))
    second = None
    if params.second_order.enabled:
        second = _second_order(
            params, model, E, layout, result["delta_theta"], result["learning_rate"], reuse.e_weights
        )

    tensors = ("xbar", "delta_theta", "e_contributions", "u_attribution", "u_attribution_loo")
    summary = DeltaH1Report(
        **{k: v for k, v in result.items() if k not in tensors},
        B_E=len(E),
        B_U=None if U_s is None else int(U_s.group_index.max()) + 1,
        G=None if U_s is None else U_s.meta.G,
        n_E_tokens=int(E.mask.sum()),
        n_U_tokens=None if U is None else int(U.mask.sum()),
        estimator=params.estimator.model_dump(),
        update=update,
        checkpoint_fingerprint=fingerprint,
        reuse=ReuseRecord.of(
            {k: s.meta.checkpoint_fingerprint for k, s in samples.items()},
            {k: len(s.input_ids) for k, s in samples.items()},
            reuse.ess,
        ),
        world_size=world,
        second_order=second,
    )
    bars = Bars(
        layout.unflatten(result["xbar"]),
        layout.unflatten(result["delta_theta"]),
        summary.learning_rate,
        params.estimator.entropy,
    )
    u_attribution = None if result["u_attribution"] is None else result["u_attribution"].tolist()
    u_loo = None if result["u_attribution_loo"] is None else result["u_attribution_loo"].tolist()
    e_contribution = result["e_contributions"].tolist()

    def write() -> None:  # every process holds the same results now; rank 0 writes them
        with staged_output_dir(out_dir) as tmp:
            bars.write(tmp)
            summary.write(tmp)
            text = attributions_csv(u_attribution, e_contribution, U_s, E_s, tokenizer, u_loo)
            write_text(tmp / ATTRIBUTIONS_FILE, text)

    distributed.on_rank0(write)  # an error there is raised on every rank
    if u_attribution is not None:
        _log_attributions(u_attribution)
    return _summary_line(summary, out_dir)


def _summary_line(summary: DeltaH1Report, out_dir: Path) -> str:
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


def _log_attributions(attribution: list[float]) -> None:
    order = sorted(range(len(attribution)), key=attribution.__getitem__)
    for what, groups in (("lowering", order[:3]), ("raising", order[::-1][:3])):
        log.info("U groups %s entropy most: %s", what, ", ".join(f"#{b} ({attribution[b]:.3g})" for b in groups))
