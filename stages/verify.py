"""The `verify` stage: load base + adapter + AdamW state, check everything, write what later stages need.

Reads the checkpoint (`checkpoint.*`); writes `entropy_probe.artifacts.verify` (verify.json, checkpoint.json,
optimizer_state.safetensors) into the output dir, all or nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from entropy_probe import outputs
from entropy_probe.artifacts.verify import STATE_FILE, Parameter, VerifyReport, write_verify
from entropy_probe.checkpoint import (
    CheckpointPaths,
    adapter_info,
    checkpoint_fingerprint,
    load_policy_model,
    resolve_paths,
)
from entropy_probe.checks import run_checks, scheduler_last_lrs
from entropy_probe.optimizer_state import OptimizerState, choose_learning_rate, learning_rate_next, load_optimizer_state
from entropy_probe.params import Params
from entropy_probe.trainer_config import TRAINER_CONFIG_KEYS, TrainerConfig, read_trainer_config

log = logging.getLogger(__name__)


def _plan(params: Params, paths: CheckpointPaths, out_dir: Path) -> str:
    ck = params.checkpoint
    info = adapter_info(paths)
    lines = [
        "verify plan:",
        *[f"  {k:20s} {v}" for k, v in paths.model_dump().items()],
        f"  adapter              rank={info.rank} alpha={info.alpha} targets={info.targets}",
        f"  load                 {'QLoRA 4-bit nf4' if ck.use_qlora else 'LoRA'} dtype={ck.dtype} "
        f"device_map={ck.device_map} checkpointing={ck.use_checkpointing}",
        f"  learning_rate        {ck.learning_rate}",
        f"  trainer config       {paths.trainer_config_path or 'no trainer_config.json'}; training_args.bin "
        f"{'read if no JSON' if ck.trust_pickles else 'not unpickled (checkpoint.trust_pickles: false)'}",
        "  checks               names/groups/shapes of Adam state, finiteness, step, lr, eval mode, adapter-only grads",
        f"  writes               {out_dir / STATE_FILE}, {out_dir / VerifyReport.FILE}",
    ]
    return "\n".join(lines)


def _report(
    params: Params, paths: CheckpointPaths, model, state: OptimizerState, trainer: dict, lr: float, checks, warnings
) -> VerifyReport:
    ck = params.checkpoint
    shapes = {n: p.shape for n, p in model.named_parameters()}
    parameters = [
        Parameter(name=n, shape=list(shapes[n]), numel=shapes[n].numel(), group=state.group_of[n]) for n in state.names
    ]
    return VerifyReport(
        fingerprint=checkpoint_fingerprint(paths),
        checkpoint=paths,
        base_model=paths.base_model,
        adapter=adapter_info(paths),
        use_qlora=ck.use_qlora,
        dtype=ck.dtype,
        device_map=ck.device_map,
        parameters=parameters,
        n_trainable=sum(p.numel for p in parameters),
        n_trainable_tensors=len(parameters),
        optimizer_mapping=state.mapping,
        param_groups=state.groups,
        learning_rate=lr,
        learning_rate_setting=ck.learning_rate,
        learning_rate_next=learning_rate_next(state)[0],
        learning_rate_last=trainer["learning_rate_last"],
        step=state.last_step,
        global_step=trainer["global_step"],
        max_grad_norm=trainer["max_grad_norm"],
        trainer_config=TrainerConfig(**{k: trainer[k] for k in TRAINER_CONFIG_KEYS}),
        trainer_config_source=trainer["trainer_config_source"],
        checks=checks,
        warnings=warnings,
    )  # no timings: later stages depend on this file, and a re-run must not change it


def run(params: Params, out_dir: Path, dry_run: bool) -> str | None:
    """Verify `checkpoint.*` and write the verify artifacts into `out_dir`; returns the one-line summary."""
    ck = params.checkpoint
    out_dir = Path(out_dir)
    paths = resolve_paths(ck)
    if dry_run:
        print(_plan(params, paths, out_dir))
        return None
    import peft  # noqa: F401,E401  (import time is not load time)

    start = time.perf_counter()
    model = load_policy_model(ck, paths)
    state = load_optimizer_state(model, paths)
    log.info("verify: loaded base + adapter + optimizer state in %.1fs", time.perf_counter() - start)
    trainer = read_trainer_config(paths, ck.trust_pickles)
    lr_next, groups_agree = learning_rate_next(state)
    lr = choose_learning_rate(ck.learning_rate, lr_next, trainer["learning_rate_last"], groups_agree)
    checks, warnings = run_checks(model, state, trainer, scheduler_last_lrs(paths.scheduler_path), ck.use_checkpointing)
    for w in warnings:
        log.warning("verify: %s", w)

    report = _report(params, paths, model, state, trainer, lr, checks, warnings)
    with outputs.staged_output_dir(out_dir) as tmp:
        write_verify(tmp, report, state)
    return (
        f"verify: {report.n_trainable_tensors} trainable tensors ({report.n_trainable} values), lr={lr:g} "
        f"(next {lr_next:g}, last {report.learning_rate_last}), step {report.step} -> {out_dir}"
    )
