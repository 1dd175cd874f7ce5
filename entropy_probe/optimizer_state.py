"""AdamW state mapped to *named* trainable parameters: the one optimizer-state type of the probe.

optimizer.pt holds `{"state": {int: {...}}, "param_groups": [{"params": [int, ...], lr, ...}]}`: the ints
are positions, not names. The HF Trainer builds two groups — decay then no-decay, each in
`model.named_parameters()` order over trainable parameters — so the k-th id of group g is the k-th
trainable parameter of that group (a name map or torch's stored `param_names` take precedence). Every
mapped tensor is checked against the live parameter's shape; any mismatch is a ProbeError naming the
parameter, never a silently fresh optimizer. The stored lr is the one of the *next* step (docs/math.md §4.4).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict
from typing_extensions import TypedDict

from .checkpoint import NAME_MAP, CheckpointPaths, first_line
from .errors import ProbeError
from .params import MAX_LEARNING_RATE
from .update import AdamState, FlatLayout

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
EIGHT_BIT_KEYS = ("state1", "state2", "__bnb_optimizer_quant_state__")  # bitsandbytes optimizers
SAME_CHECKPOINT = "check that checkpoint.path's adapter and checkpoint.optimizer_path come from the same checkpoint"
USE_TORCH_ADAMW = "the probe needs a torch AdamW optimizer.pt (Trainer optim=adamw_torch)"
USE_BNB = (
    "train with torch AdamW or bitsandbytes' blockwise AdamW8bit/PagedAdamW (the Trainer's adamw_torch, adamw_bnb_8bit)"
)


class ParamGroup(TypedDict):
    """One AdamW param group by parameter names (a dict, as torch's param groups are)."""

    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)  # as a field of verify.json

    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    names: list[str]


@dataclass
class OptimizerState:
    """AdamW state per named trainable parameter (CPU tensors, dtype as saved).

    names: trainable parameter names in optimizer order (group 0's, then group 1's, ...);
    groups: lr is the saved one (the lr of the *next* step); mapping: how positions were matched to names.
    """

    names: list[str]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    groups: list[ParamGroup]
    mapping: str
    # True: the moments hold only this process's rows of each parameter (compute.shard fsdp, `sharded`)
    sharded: bool = False
    group_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.group_of = {n: gi for gi, g in enumerate(self.groups) for n in g["names"]}
        self.exp_avg = one_buffer(self.names, self.exp_avg)
        self.exp_avg_sq = one_buffer(self.names, self.exp_avg_sq)

    @property
    def last_step(self) -> int | float:
        """The largest Adam step over the parameters (an int when whole)."""
        return whole(max(self.step.values()))

    def flat(
        self, layout: FlatLayout, theta: dict[str, torch.Tensor], lr: float | None = None, dtype=None
    ) -> AdamState:
        """This state as the update rules consume it: per-element vectors in `layout` order (with θ for the
        decoupled weight decay), θ/m/v in their own dtype unless `dtype` (lossless: the rules compute in
        float64). `lr` replaces every group's lr (None: each group keeps its saved next lr).
        The one conversion between the stored (named) and the computing (flat) form of the AdamW state."""
        return AdamState.from_groups(layout, theta, self.exp_avg, self.exp_avg_sq, self.step, self.groups, lr, dtype)


def one_buffer(names: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as views of one flat buffer in `names` order, when every name has one and they share a dtype and
    device: the update rules then take the moments flat without a second copy (`FlatLayout.flatten`), which for a
    full-parameter model is 8 bytes per parameter. Otherwise as given."""
    if set(tensors) != set(names) or len({(t.dtype, t.device) for t in tensors.values()}) > 1:
        return tensors
    parts = [tensors[n] for n in names]
    if FlatLayout.consecutive(parts) is not None:  # already one buffer
        return tensors
    flat = torch.cat([t.reshape(-1) for t in parts])
    return {n: piece.view(t.shape) for n, t, piece in zip(names, parts, flat.split([t.numel() for t in parts]))}


def whole(x: float) -> int | float:
    """`x` as an int when it is a whole number (Adam keeps its step count as a float)."""
    return int(x) if float(x).is_integer() else float(x)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# optimizer.pt -> named state


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, non-tensor globals: all unreadable input
        raise ProbeError(
            f"{what} {path} is not readable with torch.load(weights_only=True) ({first_line(exc)})",
            "point checkpoint.optimizer_path at an intact optimizer.pt (re-save the checkpoint)",
        ) from None


def trainer_param_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names per Trainer group: [decay, no-decay], each trainable-only, in named_parameters() order.

    The weight-decay rule is transformers' own (`Trainer.get_decay_parameter_names` does not touch `self`).
    """
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in trainable_parameters(model)]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def _names_from_map(path: Path, sizes: list[int]) -> list[list[str]]:
    fix = f"write {NAME_MAP} as a list of names or {{group_index: [names]}} in optimizer order"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({exc.__class__.__name__})", fix) from None
    if isinstance(raw, list):
        if len(raw) != sum(sizes):
            raise ProbeError(f"{path} lists {len(raw)} names but optimizer.pt holds {sum(sizes)} parameters", fix)
        bounds = [0, *itertools.accumulate(sizes)]
        return [list(map(str, raw[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    if isinstance(raw, dict):
        try:
            by_group = {int(k): list(map(str, v)) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ProbeError(f"{path} has non-integer group keys", fix) from None
        if set(by_group) - set(range(len(sizes))):
            raise ProbeError(f"{path} names groups {sorted(by_group)} but optimizer.pt has {len(sizes)}", fix)
        groups = [by_group.get(gi, []) for gi in range(len(sizes))]
        for gi, (names, size) in enumerate(zip(groups, sizes)):
            if len(names) != size:
                raise ProbeError(f"{path} lists {len(names)} names for group {gi}, optimizer.pt has {size}", fix)
        return groups
    raise ProbeError(f"{path} is neither a list nor a dict", fix)


def _group_names(
    model: torch.nn.Module, saved_groups: list[dict], name_map: Path | None
) -> tuple[list[list[str]], str]:
    """Names for the saved ids of each group, and how they were found."""
    sizes = [len(g["params"]) for g in saved_groups]
    if name_map is not None:
        return _names_from_map(name_map, sizes), f"name map {name_map.name}"
    if saved_groups and all("param_names" in g for g in saved_groups):  # optimizer built from named params
        return [list(g["param_names"]) for g in saved_groups], "param_names stored in optimizer.pt"
    expected = trainer_param_groups(model)
    fix = (
        "the adapter does not match this optimizer state: check checkpoint.path / checkpoint.optimizer_path, "
        f"or write {NAME_MAP} (names in optimizer order) beside optimizer.pt"
    )
    if len(saved_groups) == 2:
        if sizes != [len(g) for g in expected]:
            raise ProbeError(
                f"optimizer.pt has param groups of sizes {sizes}, but the model's trainable parameters form "
                f"Trainer groups (decay, no-decay) of sizes {[len(g) for g in expected]}",
                fix,
            )
        return expected, "Trainer groups (decay, no-decay)"
    flat = expected[0] + expected[1]
    if len(saved_groups) == 1 and sizes[0] == len(flat):  # e.g. AdamW(model.parameters()) built by hand
        order = [n for n, _ in trainable_parameters(model)]
        return [order], "one group in named_parameters() order"
    raise ProbeError(
        f"optimizer.pt has {len(saved_groups)} param groups of sizes {sizes}; the Trainer layout for this model is "
        f"2 groups of sizes {[len(g) for g in expected]}",
        fix,
    )


def _group_hyper(g: dict, gi: int) -> dict:
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
    if missing:
        raise ProbeError(
            f"optimizer.pt param group {gi} lacks {missing} (not an Adam/AdamW state)",
            "the probe needs a torch AdamW optimizer.pt (Trainer optim=adamw_torch)",
        )
    if g.get("amsgrad") or g.get("maximize"):
        which = "amsgrad" if g.get("amsgrad") else "maximize"
        raise ProbeError(
            f"optimizer.pt param group {gi} uses {which}=True, which the probe does not model",
            "probe a checkpoint trained with plain AdamW",
        )
    if g.get("decoupled_weight_decay") is False and float(g["weight_decay"]) != 0.0:
        raise ProbeError(
            f"optimizer.pt param group {gi} is Adam with L2 weight decay (not decoupled AdamW)",
            "probe a checkpoint trained with AdamW",
        )
    # with checkpoint.learning_rate 'next' each group steps with its own stored lr: it must be one
    _check_stored_learning_rate(float(g["lr"]), f"the next-step lr stored in optimizer.pt param group {gi}")
    return {
        "lr": float(g["lr"]),
        "betas": [float(b) for b in g["betas"]],
        "eps": float(g["eps"]),
        "weight_decay": float(g["weight_decay"]),
    }


BNB_NESTED = "__bnb_optimizer_quant_state__"  # bitsandbytes ≥ 0.50 nests its per-parameter state under this key
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the blockwise optimizers use 256 (CPU and CUDA)


def dequantised_bnb_state(st: dict, what: str) -> dict:
    """{exp_avg, exp_avg_sq, step} of one parameter from a bitsandbytes Adam/AdamW state (8-bit blockwise, or
    32-bit for small tensors and the 32-bit/paged variants): state1 = m, state2 = v, and for 8-bit codes

        m = qmap1[state1] · absmax1[block],   v = qmap2[state2] · absmax2[block]   (blocks of the flat tensor)

    exactly the values bitsandbytes dequantises before its step, whose arithmetic is then torch AdamW's (decoupled
    decay, the same bias corrections), so the emulated Δθ is the real one up to float32 rounding of θ. Refused:
    non-blockwise 8-bit state (no absmax) and AdEMAMix's two first moments."""
    q = st.get(BNB_NESTED, st)
    if not {"state1", "state2"} <= set(q):
        raise ProbeError(f"bitsandbytes state of {what} lacks state1/state2 (not an Adam/AdamW state)", USE_TORCH_ADAMW)
    moments = []
    for i in (1, 2):
        codes = q[f"state{i}"]
        if f"qmap{i}" not in q:  # a 32-bit state
            moments.append(codes.to(torch.float32, copy=True))  # never an alias of a live optimizer's state
            continue
        absmax = q.get(f"absmax{i}")
        if absmax is None or absmax.dim() != 1:
            kind = "non-blockwise 8-bit (percentile clipping or block_wise=False)" if absmax is None else "AdEMAMix"
            raise ProbeError(f"bitsandbytes state of {what} is {kind} state, which the probe does not model", USE_BNB)
        n, blocks = codes.numel(), absmax.numel()
        size = next((b for b in BNB_BLOCKSIZES if -(-n // b) == blocks), None)
        if size is None:
            raise ProbeError(f"bitsandbytes state of {what}: {blocks} absmax blocks fit no block size for {n}", USE_BNB)
        scale = absmax.float().repeat_interleave(size)[:n].view(codes.shape)
        moments.append(q[f"qmap{i}"].float()[codes.long()] * scale)
    return {"exp_avg": moments[0], "exp_avg_sq": moments[1], "step": st.get("step", q.get("step"))}


def _dequantise_bnb(state: dict, groups: list[dict]) -> dict:
    """The optimizer.pt state with bitsandbytes entries turned into torch AdamW's keys (`dequantised_bnb_state`);
    torch states are passed through. A bitsandbytes AdEMAMix group (alpha ≠ 0) is refused."""
    bnb = [pid for pid, st in state.items() if isinstance(st, dict) and any(k in st for k in EIGHT_BIT_KEYS)]
    if not bnb:
        return state
    _refuse_ademamix(groups)
    return {pid: dequantised_bnb_state(st, f"param id {pid}") if pid in bnb else st for pid, st in state.items()}


def _refuse_ademamix(groups: list[dict]) -> None:
    for gi, g in enumerate(groups):
        if g.get("alpha") or g.get("t_alpha") or g.get("t_beta3"):
            raise ProbeError(f"optimizer param group {gi} is bitsandbytes AdEMAMix, not AdamW", USE_BNB)


def _check_names(names: list[str], params: dict[str, torch.nn.Parameter]) -> None:
    """The mapped names are exactly the trainable parameters, each once."""
    fix = SAME_CHECKPOINT
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ProbeError(
            f"optimizer state names parameter {unknown[0]}, which is not a trainable parameter of the model", fix
        )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ProbeError(f"parameter {dup} appears twice in the optimizer's groups", fix)
    uncovered = [n for n in params if n not in set(names)]
    if uncovered:
        raise ProbeError(f"trainable parameter {uncovered[0]} is in no optimizer param group", fix)


def _adam_state(name: str, st: dict | None, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(exp_avg, exp_avg_sq, step) of one parameter, refused unless complete, of its shape, finite, v >= 0."""
    if not st:
        raise ProbeError(
            f"trainable parameter {name} has no optimizer state (it never received a gradient: "
            "torch creates Adam state lazily)",
            "the probe needs state for every trainable parameter; check that the weights match optimizer.pt "
            "or probe a checkpoint where every trained tensor was updated",
        )
    missing = [k for k in ADAM_STATE_KEYS if k not in st]
    if missing:
        raise ProbeError(
            f"optimizer state of {name} lacks {missing} (not an Adam/AdamW state)",
            "the probe needs a torch AdamW optimizer.pt (Trainer optim=adamw_torch)",
        )
    for key in ("exp_avg", "exp_avg_sq"):
        t = st[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ProbeError(
                f"{key} of {name} has shape {got}, the parameter has {shape} (e.g. a different LoRA rank)",
                SAME_CHECKPOINT,
            )
        if not bool(torch.isfinite(t).all()):
            raise ProbeError(
                f"{key} of {name} contains NaN/inf",
                "probe an earlier checkpoint (training diverged before this one was saved)",
            )
    if bool((st["exp_avg_sq"] < 0).any()):
        raise ProbeError(f"exp_avg_sq of {name} has negative entries (corrupt state)", "re-save the checkpoint")
    step = float(st["step"])
    if not math.isfinite(step) or step < 1:
        raise ProbeError(f"optimizer step of {name} is {step}, expected >= 1", "re-save the checkpoint")
    return st["exp_avg"], st["exp_avg_sq"], step


def load_optimizer_state(model: torch.nn.Module, paths: CheckpointPaths) -> OptimizerState:
    """Read optimizer.pt (weights_only) and map its positional ids to named trainable parameters.

    Refuses (ProbeError naming the parameter): group/count mismatch, unknown or duplicate names, a trainable
    parameter without state (lazy state: it never had a gradient), shape mismatch, missing exp_avg /
    exp_avg_sq / step, non-finite moments, negative exp_avg_sq. bitsandbytes state is dequantised first.
    """
    saved = _torch_load(paths.optimizer_path, "optimizer state")
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
    ):
        raise ProbeError(
            f"{paths.optimizer_path} is not a torch optimizer state_dict (no 'state'/'param_groups')",
            "point checkpoint.optimizer_path at the optimizer.pt the Trainer saved",
        )
    saved_groups, state = saved["param_groups"], saved["state"]
    params = dict(trainable_parameters(model))
    state = _dequantise_bnb(state, saved_groups)
    group_names, how = _group_names(model, saved_groups, paths.name_map_path)
    names = [n for names in group_names for n in names]
    _check_names(names, params)

    exp_avg, exp_avg_sq, step = {}, {}, {}
    for g, gnames in zip(saved_groups, group_names):
        for pid, name in zip(g["params"], gnames):
            exp_avg[name], exp_avg_sq[name], step[name] = _adam_state(name, state.get(pid), tuple(params[name].shape))
    groups = [
        ParamGroup(**_group_hyper(g, gi), names=gnames) for gi, (g, gnames) in enumerate(zip(saved_groups, group_names))
    ]
    return OptimizerState(names=names, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step, groups=groups, mapping=how)


def optimizer_state_of(model: torch.nn.Module, optimizer) -> OptimizerState:
    """The live AdamW state of a torch optimizer over `model` (a Trainer's, possibly wrapped by accelerate in
    `.optimizer`), copied to CPU: names by parameter identity, the same checks as `load_optimizer_state`.
    Between steps a group's lr is the next step's (the scheduler has stepped), as in a saved optimizer.pt."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise ProbeError(f"{type(optimizer).__name__} is not a torch optimizer", "train with optim=adamw_torch")
    name_of = {id(p): n for n, p in trainable_parameters(model)}
    states, groups = {}, []
    for gi, g in enumerate(inner.param_groups):
        names = [name_of.get(id(p)) for p in g["params"]]
        if None in names:
            raise ProbeError(
                f"optimizer param group {gi} holds a parameter that is not a trainable parameter of the model",
                "pass the model the optimizer trains (the trainer's model)",
            )
        for name, p in zip(names, g["params"]):
            live = inner.state.get(p, {})
            if any(k in live for k in EIGHT_BIT_KEYS):  # bitsandbytes (8-bit or paged): its dequantised moments
                _refuse_ademamix(inner.param_groups)
                live = dequantised_bnb_state(live, name)
            states[name] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in live.items()}
        groups.append({**g, "names": names})
    return optimizer_state_from(model, states, groups, mapping="live optimizer (by parameter identity)")


def optimizer_state_from(model: torch.nn.Module, states: dict[str, dict], groups: list[dict], mapping: str):
    """An OptimizerState from AdamW state already named ({name: {exp_avg, exp_avg_sq, step}}) and param groups
    ({lr, betas, eps, weight_decay, names, ...} each), with `load_optimizer_state`'s checks: the names are
    exactly the trainable parameters, every one has complete state of its shape, finite, exp_avg_sq ≥ 0."""
    params = dict(trainable_parameters(model))
    names = [n for g in groups for n in g["names"]]
    _check_names(names, params)
    exp_avg, exp_avg_sq, step = {}, {}, {}
    for name in names:
        exp_avg[name], exp_avg_sq[name], step[name] = _adam_state(name, states.get(name), tuple(params[name].shape))
    named_groups = [ParamGroup(**_group_hyper(g, gi), names=list(g["names"])) for gi, g in enumerate(groups)]
    return OptimizerState(names, exp_avg, exp_avg_sq, step, named_groups, mapping)


def build_adamw(model: torch.nn.Module, state: OptimizerState, lr: float | None = None) -> torch.optim.AdamW:
    """A real torch AdamW over `model`'s named parameters carrying `state` (to check update rules against).

    lr (optional) replaces every group's lr — e.g. the chosen learning rate.
    """
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {
                "params": [params[n] for n in g["names"]],
                "lr": g["lr"] if lr is None else lr,
                "betas": tuple(g["betas"]),
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
            }
            for g in state.groups
        ],
        foreach=False,
    )
    for n in state.names:
        p = params[n]
        opt.state[p] = {
            "step": torch.tensor(state.step[n], dtype=torch.float32),
            "exp_avg": state.exp_avg[n].to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": state.exp_avg_sq[n].to(device=p.device, dtype=p.dtype).clone(),
        }
    return opt


# ----------------------------------------------------------------------------------------------
# the learning rate of the probed step


def learning_rate_next(state: OptimizerState) -> tuple[float, bool]:
    """The lr stored in the (first non-empty) param group = the lr of the next step; and whether all
    non-empty groups agree."""
    lrs = [g["lr"] for g in state.groups if g["names"]]
    return lrs[0], len(set(lrs)) == 1


def _check_stored_learning_rate(lr: float, source: str) -> None:
    """A learning rate read from the checkpoint is finite and in [0, MAX_LEARNING_RATE] (0: end of a schedule)."""
    if not (math.isfinite(lr) and 0 <= lr <= MAX_LEARNING_RATE):
        raise ProbeError(
            f"{source} is {lr:g}, which is no fine-tuning learning rate (expected 0 to {MAX_LEARNING_RATE:g}; "
            "AdamW moves each parameter by about lr per step)",
            "check the trainer's learning rate (RL fine-tuning uses far less than 1) and that the checkpoint is intact",
        )


def choose_learning_rate(
    setting: str | float, lr_next: float, lr_last: float | None, groups_agree: bool = True
) -> float:
    """checkpoint.learning_rate: 'next' (optimizer's), 'last' (trainer_state's last logged) or a number > 0.

    A stored lr ('next': every group's was checked when optimizer.pt was read; 'last') must be a learning rate:
    finite and at most MAX_LEARNING_RATE.
    """
    if setting != "next" and not groups_agree:
        raise ProbeError(
            "the optimizer's param groups have different learning rates, so one checkpoint.learning_rate is ambiguous",
            "set checkpoint.learning_rate: next (each group keeps its own lr)",
        )
    if setting == "next":
        _check_stored_learning_rate(lr_next, "the next-step lr stored in optimizer.pt")
        lr = lr_next
    elif setting == "last":
        if lr_last is None:
            raise ProbeError(
                "checkpoint.learning_rate is 'last' but no trainer_state.json with a logged learning_rate was found",
                "set checkpoint.learning_rate to next or a number",
            )
        _check_stored_learning_rate(lr_last, "the last learning rate logged in trainer_state.json")
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
