"""The `verify` stage: load base + adapter + AdamW state, check everything, write what later stages need.

Writes (atomically, into `paths.verify`):
- `optimizer_state.safetensors` (kind `optimizer_state`): exp_avg.<name>, exp_avg_sq.<name>, step.<name>
  (float64 scalar) for every trainable parameter, named as the loaded PeftModel names it;
- `verify.json`: fingerprint, paths, adapter, parameters, param groups, the chosen learning rate, trainer
  config, checks (docs/design.md).
Later stages call `read_verify` and never re-read optimizer.pt.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import files, outputs
from .checkpoint import (
    CheckpointPaths,
    OptimizerState,
    TRAINER_CONFIG_KEYS,
    adapter_info,
    checkpoint_fingerprint,
    load_optimizer_state,
    load_policy_model,
    read_trainer_config,
    resolve_paths,
)
from .errors import ProbeError
from .params import Params

log = logging.getLogger(__name__)

REPORT = "verify.json"
# What identifies the checkpoint (no timings, no lr choice): sampling stages depend on this file only,
# so re-verifying with another learning_rate does not re-sample.
IDENTITY = "checkpoint.json"
IDENTITY_KEYS = ("fingerprint", "checkpoint", "base_model", "adapter", "trainer_config", "trainer_config_source")
STATE = "optimizer_state.safetensors"
KIND = "optimizer_state"
REQUIRED_KEYS = ("fingerprint", "parameters", "param_groups", "learning_rate", "step", "trainer_config")


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def learning_rate_next(state: OptimizerState) -> tuple[float, bool]:
    """The lr stored in the (first non-empty) param group = the lr of the next step; and whether all
    non-empty groups agree."""
    lrs = [g["lr"] for g in state.groups if g["names"]]
    return lrs[0], len(set(lrs)) == 1


def choose_learning_rate(
    setting: str | float, lr_next: float, lr_last: float | None, groups_agree: bool = True
) -> float:
    """checkpoint.learning_rate: 'next' (optimizer's), 'last' (trainer_state's last logged) or a number > 0."""
    if setting != "next" and not groups_agree:
        raise ProbeError(
            "the optimizer's param groups have different learning rates, so one checkpoint.learning_rate is ambiguous",
            "set checkpoint.learning_rate: next (each group keeps its own lr)",
        )
    if setting == "next":
        lr = lr_next
    elif setting == "last":
        if lr_last is None:
            raise ProbeError(
                "checkpoint.learning_rate is 'last' but no trainer_state.json with a logged learning_rate was found",
                "set checkpoint.learning_rate to next or a number",
            )
        lr = lr_last
    else:
        lr = float(setting)
    if lr == 0:
        raise ProbeError(
            f"the chosen learning rate ({setting}) is 0: next-step lr = {lr_next}, last applied lr = {lr_last} "
            "(a linear schedule ends at 0, so the next step would not move the policy)",
            "set checkpoint.learning_rate to last or a number",
        )
    return lr


def _scheduler_lrs(path: Path | None) -> list[float] | None:
    if path is None:
        return None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return [float(x) for x in sd["_last_lr"]]
    except Exception:  # schedulers with non-tensor state, or foreign files: the check is advisory
        return None


def run_checks(
    model, state: OptimizerState, tcfg: dict, paths: CheckpointPaths, use_checkpointing: bool
) -> tuple[list[str], list[str]]:
    """Checks beyond those load_optimizer_state enforces; returns (passed, warnings). Hard failures raise."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    checks, warnings = [], []
    adapter_tag = f".{getattr(model, 'active_adapter', 'default')}."
    foreign = [n for n in state.names if adapter_tag not in n]
    if foreign:
        raise ProbeError(f"base parameter {foreign[0]} requires grad", "probe an adapter checkpoint (LoRA/QLoRA)")
    checks.append(f"only adapter parameters are trainable ({len(state.names)} tensors)")
    # with checkpointing the decoder layers carry training=True on purpose (checkpoint.py); their submodules don't
    flagged = (GradientCheckpointingLayer,) if use_checkpointing else ()
    training = [n for n, m in model.named_modules() if m.training and not isinstance(m, flagged)]
    if training:
        raise ProbeError(f"module {training[0]} is in training mode after loading", "report this as a bug")
    checks.append("eval mode: dropout off")
    sizes = [len(g["names"]) for g in state.groups]
    checks.append(f"optimizer state mapped by {state.mapping}: group sizes {sizes}")
    checks.append("exp_avg / exp_avg_sq: every trainable parameter has state of its shape, finite, exp_avg_sq >= 0")
    steps = sorted(set(state.step.values()))
    if len(steps) == 1:
        checks.append(f"Adam step {_number(steps[0])} for every parameter")
    else:
        warnings.append(f"Adam steps differ across parameters ({_number(steps[0])}..{_number(steps[-1])})")
    gs = tcfg.get("global_step")
    if gs is not None:
        if int(gs) == int(steps[-1]):
            checks.append(f"Adam step matches trainer_state global_step {gs}")
        else:
            warnings.append(f"Adam step {_number(steps[-1])} != trainer_state global_step {gs} (skipped steps?)")
    last_step = tcfg.get("learning_rate_last_step")
    if tcfg.get("learning_rate_last") is not None and gs is not None and last_step != gs:
        warnings.append(f"last logged learning_rate is from step {last_step}, not the last step {gs}")
    sched = _scheduler_lrs(paths.scheduler_path)
    group_lrs = [g["lr"] for g in state.groups]
    if sched is not None:
        close = all(abs(a - b) <= 1e-12 + 1e-6 * abs(b) for a, b in zip(sched, group_lrs))
        if len(sched) == len(group_lrs) and close:
            checks.append("scheduler.pt last lr equals the optimizer's param-group lr")
        else:
            warnings.append(f"scheduler.pt last lr {sched} differs from the optimizer's param-group lrs {group_lrs}")
    return checks, warnings


def _plan(params: Params, paths: CheckpointPaths, out_dir: Path) -> str:
    ck = params.checkpoint
    info = adapter_info(paths)
    lines = [
        "verify plan:",
        *[f"  {k:20s} {v}" for k, v in paths.as_dict().items()],
        f"  adapter              rank={info['rank']} alpha={info['alpha']} targets={info['targets']}",
        f"  load                 {'QLoRA 4-bit nf4' if ck.use_qlora else 'LoRA'} dtype={ck.dtype} "
        f"device_map={ck.device_map} checkpointing={ck.use_checkpointing}",
        f"  learning_rate        {ck.learning_rate}",
        f"  trainer config       {paths.trainer_config_path or 'no trainer_config.json'}; training_args.bin "
        f"{'read if no JSON' if ck.trust_pickles else 'not unpickled (checkpoint.trust_pickles: false)'}",
        "  checks               names/groups/shapes of Adam state, finiteness, step, lr, eval mode, adapter-only grads",
        f"  writes               {out_dir / STATE}, {out_dir / REPORT}",
    ]
    return "\n".join(lines)


def run(params: Params, out_dir: Path, dry_run: bool) -> None:
    ck = params.checkpoint
    out_dir = Path(out_dir)
    paths = resolve_paths(ck)
    if dry_run:
        print(_plan(params, paths, out_dir))
        return
    import peft, transformers  # noqa: F401,E401  (import time is not load time)

    t0 = time.perf_counter()
    model = load_policy_model(ck, paths)
    state = load_optimizer_state(model, paths)
    load_seconds = time.perf_counter() - t0
    tcfg = read_trainer_config(paths, ck.trust_pickles)
    lr_next, agree = learning_rate_next(state)
    lr = choose_learning_rate(ck.learning_rate, lr_next, tcfg["learning_rate_last"], agree)
    checks, warnings = run_checks(model, state, tcfg, paths, ck.use_checkpointing)
    if not agree:
        warnings.append(f"param groups have different lrs {[g['lr'] for g in state.groups]}; each keeps its own")
    for w in warnings:
        log.warning("verify: %s", w)

    fingerprint = checkpoint_fingerprint(paths)
    params_by_name = dict(model.named_parameters())
    report = {
        "fingerprint": fingerprint,
        "checkpoint": paths.as_dict(),
        "base_model": paths.base_model,
        "adapter": adapter_info(paths),
        "use_qlora": ck.use_qlora,
        "dtype": ck.dtype,
        "device_map": ck.device_map,
        "parameters": [
            {
                "name": n,
                "shape": list(params_by_name[n].shape),
                "numel": params_by_name[n].numel(),
                "group": state.group_of[n],
            }
            for n in state.names
        ],
        "n_trainable": sum(params_by_name[n].numel() for n in state.names),
        "n_trainable_tensors": len(state.names),
        "optimizer_mapping": state.mapping,
        "param_groups": state.groups,
        "learning_rate": lr,
        "learning_rate_setting": ck.learning_rate,
        "learning_rate_next": lr_next,
        "learning_rate_last": tcfg["learning_rate_last"],
        "step": _number(max(state.step.values())),
        "global_step": tcfg["global_step"],
        "max_grad_norm": tcfg["max_grad_norm"],
        "trainer_config": {k: tcfg[k] for k in TRAINER_CONFIG_KEYS},
        "trainer_config_source": tcfg["trainer_config_source"],
        "checks": checks,
        "warnings": warnings,
    }  # no timings: later stages depend on this file, and a re-run must not change it
    tensors = {}
    for n in state.names:
        tensors[f"exp_avg.{n}"] = state.exp_avg[n]
        tensors[f"exp_avg_sq.{n}"] = state.exp_avg_sq[n]
        tensors[f"step.{n}"] = torch.tensor(state.step[n], dtype=torch.float64)
    with outputs.staged_output_dir(out_dir) as tmp:
        files.write_tensors(tmp / STATE, tensors, kind=KIND, meta={"fingerprint": fingerprint})
        files.write_json(tmp / REPORT, report)
        files.write_json(tmp / IDENTITY, {k: report[k] for k in IDENTITY_KEYS})
    log.info(
        "verify: %d trainable tensors (%d values), lr=%g (next %g, last %s), step %s, loaded in %.1fs -> %s",
        len(state.names),
        report["n_trainable"],
        lr,
        lr_next,
        tcfg["learning_rate_last"],
        report["step"],
        load_seconds,
        out_dir,
    )


def read_verify(verify_dir: str | Path) -> tuple[dict, OptimizerState]:
    """The verify report and the optimizer state it wrote (schema- and fingerprint-checked)."""
    verify_dir = Path(verify_dir)
    report = files.read_json(verify_dir / REPORT, "verify report")
    fix = "rerun entropy-probe verify"
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ProbeError(f"verify report {verify_dir / REPORT} lacks {missing}", fix)
    tensors, meta = files.read_tensors(verify_dir / STATE, KIND)
    if meta.get("fingerprint") != report["fingerprint"]:
        raise ProbeError(
            f"{verify_dir / STATE} (checkpoint {meta.get('fingerprint')}) does not belong to {REPORT} "
            f"(checkpoint {report['fingerprint']})",
            fix,
        )
    names = [p["name"] for p in report["parameters"]]
    absent = [f"{k}.{n}" for n in names for k in ("exp_avg", "exp_avg_sq", "step") if f"{k}.{n}" not in tensors]
    if absent:
        raise ProbeError(f"{verify_dir / STATE} lacks tensor {absent[0]}", fix)
    groups = [
        {k: list(g[k]) if k in ("betas", "names") else g[k] for k in ("lr", "betas", "eps", "weight_decay", "names")}
        for g in report["param_groups"]
    ]
    state = OptimizerState(
        names=names,
        exp_avg={n: tensors[f"exp_avg.{n}"] for n in names},
        exp_avg_sq={n: tensors[f"exp_avg_sq.{n}"] for n in names},
        step={n: float(tensors[f"step.{n}"]) for n in names},
        groups=groups,
        mapping=report.get("optimizer_mapping", ""),
    )
    return report, state
