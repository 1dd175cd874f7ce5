"""The `verify` stage: load the policy (base + adapter, or a full model) + AdamW state, check everything, write
what later stages need.

Reads the checkpoint (`checkpoint.*`); writes `entropy_probe.artifacts.verify` (verify.json, checkpoint.json,
optimizer_state.safetensors) into the output dir, all or nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from entropy_probe import outputs
from entropy_probe.artifacts.verify import STATE_FILE, Parameter, VerifyReport, write_verify
from entropy_probe.checkpoint import CheckpointPaths, adapter_info
from entropy_probe.checks import run_checks, scheduler_last_lrs
from entropy_probe.optimizer_state import OptimizerState, choose_learning_rate, learning_rate_next
from entropy_probe.params import Params

log = logging.getLogger(__name__)


def _plan(params: Params, paths: CheckpointPaths, out_dir: Path) -> str:
    ck = params.checkpoint
    info = adapter_info(paths)
    what = "full model" if info is None else "QLoRA 4-bit nf4" if ck.use_qlora else "LoRA"
    lines = [
        "verify plan:",
        *[f"  {k:20s} {v}" for k, v in paths.model_dump().items()],
        f"  adapter              rank={info.rank} alpha={info.alpha} targets={info.targets}"
        if info is not None
        else "  adapter              none: every parameter is trainable",
        f"  load                 {what} dtype={ck.dtype} "
        f"device_map={ck.device_map} checkpointing={ck.use_checkpointing}",
        f"  learning_rate        {ck.learning_rate}",
        f"  trainer config       {paths.trainer_config_path or 'no trainer_config.json'}; training_args.bin "
        f"{'read if no JSON' if ck.trust_pickles else 'not unpickled (checkpoint.trust_pickles: false)'}",
        "  checks               names/groups/shapes of Adam state, finiteness, step, lr, eval mode, trainable set",
        f"  writes               {out_dir / STATE_FILE}, {out_dir / VerifyReport.FILE}",
    ]
    return "\n".join(lines)


def _report(params: Params, ck, state: OptimizerState, lr: float, checks, warnings) -> VerifyReport:
    paths, trainer = ck.paths, ck.trainer
    shapes = {n: p.shape for n, p in ck.model.named_parameters()}
    parameters = [
        Parameter(name=n, shape=list(shapes[n]), numel=shapes[n].numel(), group=state.group_of[n]) for n in state.names
    ]
    return VerifyReport(
        fingerprint=ck.fingerprint,
        checkpoint=paths,
        base_model=paths.base_model,
        adapter=adapter_info(paths),
        use_qlora=params.checkpoint.use_qlora,
        dtype=params.checkpoint.dtype,
        device_map=params.checkpoint.device_map,
        parameters=parameters,
        n_trainable=sum(p.numel for p in parameters),
        n_trainable_tensors=len(parameters),
        optimizer_mapping=state.mapping,
        param_groups=state.groups,
        learning_rate=lr,
        learning_rate_setting=params.checkpoint.learning_rate,
        learning_rate_next=learning_rate_next(state)[0],
        learning_rate_last=trainer.learning_rate_last,
        step=state.last_step,
        global_step=trainer.global_step,
        max_grad_norm=trainer.config.max_grad_norm,
        trainer_config=trainer.config,
        trainer_config_source=trainer.source,
        checks=checks,
        warnings=warnings,
    )  # no timings: later stages depend on this file, and a re-run must not change it


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    """Verify `checkpoint.*` and write the verify artifacts into `out_dir`; returns the one-line summary."""
    from entropy_probe.sources import load_checkpoint, source_for

    out_dir = Path(out_dir)
    if dry_run:
        return _plan(params, source_for(params.checkpoint).resolve(params.checkpoint), out_dir)

    start = time.perf_counter()
    ck = load_checkpoint(params.checkpoint)
    state = ck.optimizer
    log.info("verify: loaded %s + optimizer state in %.1fs", ck.paths.format, time.perf_counter() - start)
    lr_next, groups_agree = learning_rate_next(state)
    lr_last = ck.trainer.learning_rate_last
    lr = choose_learning_rate(params.checkpoint.learning_rate, lr_next, lr_last, groups_agree)
    scheduler = scheduler_last_lrs(ck.paths.scheduler_path)
    checks, warnings = run_checks(ck.model, state, ck.trainer, scheduler, params.checkpoint.use_checkpointing)
    for w in warnings:
        log.warning("verify: %s", w)

    report = _report(params, ck, state, lr, checks, warnings)
    with outputs.staged_output_dir(out_dir) as tmp:
        write_verify(tmp, report, state)
    return (
        f"verify: {ck.paths.format}, {report.n_trainable_tensors} trainable tensors ({report.n_trainable} values), lr={lr:g} "
        f"(next {lr_next:g}, last {report.learning_rate_last}), step {report.step} -> {out_dir}"
    )
