"""The delta-h1 stage's outputs: delta_h1.json (`DeltaH1Report`), bars.safetensors (`Bars`), attributions.csv.

Written by delta-h1; exact, truth and report read them. delta_h1.json keys (docs/math.md §5):

    delta_h1, delta_h1_from_tangents, bars_dot, learning_rate, entropy, se_delta_h1, se_E, se_U,
    delta_h1_gradient_part, delta_h1_momentum_part, delta_h1_gradient_part_linearised,
    delta_h1_naive, se_E_naive, cov_logp_advantage, norm_xbar, norm_delta_theta, norm_g,
    targets {sequence, token_mean, seq_mean_token_mean: {delta_h1, se_E, entropy (+ se_U, se_delta_h1
             for the configured target)}} (all three with compute.all_targets, else the configured one),
    B_E, B_U, G, n_E_tokens, n_U_tokens, estimator {entropy, baseline, ridge, crossfit_folds},
    update {rule, loss_agg_mode, loss_agg_reason, max_len, max_grad_norm, max_grad_norm_source
            (rule observed: observed {next_checkpoint, next_checkpoint_fingerprint, step, next_step,
             norm_delta_theta_obs} instead of the loss and clipping keys)},
    checkpoint_fingerprint, reuse {weighted, sampler_fingerprint {E, U}, ess_fraction_E, ess_fraction_U
                                   (+ ess_E, ess_U for a re-weighted batch)}, world_size, shard,
    optional: se_U_note, se_U_method, second_order {delta_h2, se_delta_h2, delta_h1, delta_h1_plus_h2, eta_star,
              step_multiplier_star, fraction, verdict, fd_eps, ess_fraction_plus, ess_fraction_minus}

With update.rule `observed` (Δθ = θ(next checkpoint) − θ(this), docs/math.md §4.8) there is no U batch: the
U-dependent keys (se_U, the gradient/momentum parts, cov_logp_advantage, norm_g, B_U, G, n_U_tokens,
ess_fraction_U) are null and se_delta_h1 = se_E. For the other rules se_U may be null too, with se_U_note
saying why.

bars.safetensors (kind "bars"): `xbar.<name>` = X̄ and `delta_theta.<name>` = Δθ (float32, lr included) per
trainable parameter; metadata {learning_rate, target}. attributions.csv: one row per U prompt group and
per E sequence (batch, index, prompt_index, contribution, prompt, responses, contribution_loo), most negative
first; contribution_loo is a U group's leave-one-group-out attribution when delta-h1 computed one (else
empty); with update.rule observed there are E rows only.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_serializer, model_validator

from ..errors import ProbeError
from ..estimators import TARGETS
from ..files import read_tensors, write_tensors
from .base import JsonArtifact, Record

Target = Literal["sequence", "token_mean", "seq_mean_token_mean"]
BARS_FILE = "bars.safetensors"
BARS_KIND = "bars"
ATTRIBUTIONS_FILE = "attributions.csv"
RERUN = "rerun the delta-h1 stage (dvc repro)"
RERUN_FOR_CHECKPOINT = "rerun delta-h1 for this checkpoint"


class _Sparse(Record):
    """A record whose optional fields are left out of the file when they are None (not written as null)."""

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler) -> dict[str, Any]:
        optional = {name for name, f in type(self).model_fields.items() if not f.is_required()}
        return {k: v for k, v in handler(self).items() if not (k in optional and v is None)}


class TargetEstimate(_Sparse):
    """δH₁ and SE_E of one entropy target (from the tangents), its plug-in entropy; SE_U and the total SE
    for the configured target only."""

    delta_h1: float
    se_E: float
    entropy: float
    se_U: float | None = None
    se_delta_h1: float | None = None


class EstimatorRecord(Record):
    """The estimator params delta-h1 ran with (a copy: reading it is not reading params)."""

    entropy: Target
    baseline: Literal["none", "mean", "regression"]
    ridge: float
    crossfit_folds: int


class ObservedRecord(Record):
    """The trainer's own step Δθ_obs = θ(next) − θ(this) (update.rule observed, docs/math.md §4.8)."""

    next_checkpoint: str  # the path delta-h1 read θ(next) from
    next_checkpoint_fingerprint: str
    step: int | None  # N of checkpoint-N (None: not named so)
    next_step: int | None  # N of the next checkpoint; next_step − step > 1: several trainer steps
    norm_delta_theta_obs: float = Field(ge=0)


class StepsRecord(Record):
    """Several AdamW steps on one U batch (docs/math.md §4.10): how many, the clipped ratio's range."""

    mini_batches: int
    epochs: int
    clip_low: float
    clip_high: float
    token_normaliser: Literal["mini_batch", "batch"]
    source: str

    @classmethod
    def of(cls, chain) -> "StepsRecord":
        return cls(
            mini_batches=chain.mini_batches,
            epochs=chain.epochs,
            clip_low=chain.clip_low,
            clip_high=chain.clip_high,
            token_normaliser=chain.token_normaliser,
            source=chain.source,
        )


class UpdateRecord(_Sparse):
    """How Δθ was formed: the emulated rule's loss aggregation and clipping, or the observed step."""

    rule: Literal["adam_step", "adam_precond", "sgd", "observed"]
    loss_agg_mode: (
        Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] | None
    ) = None
    loss_agg_reason: str | None = None
    max_len: int | None = None
    max_grad_norm: float | None = None
    max_grad_norm_source: str | None = None
    observed: ObservedRecord | None = None
    steps: StepsRecord | None = None  # several steps per U batch (None: one)
    # the trainer's loss beyond the policy-gradient term (`loss_terms`; None: absent)
    entropy_coef: float | None = None
    token_mask: Literal["top_cov", "top_entropy", "bottom_entropy"] | None = None
    token_mask_fraction: float | None = None
    kl_coef: float | None = None

    @model_validator(mode="after")
    def _fields_of_the_rule(self) -> "UpdateRecord":
        if (self.rule == "observed") != (self.observed is not None):
            raise ValueError("'observed' is present exactly when rule is observed")
        if self.rule != "observed" and (self.loss_agg_mode is None or self.max_grad_norm_source is None):
            raise ValueError(f"rule {self.rule} needs loss_agg_mode, loss_agg_reason and max_grad_norm_source")
        return self


class SecondOrderRecord(Record):
    """δH₂ = ½ Δθᵀ∇²HΔθ ± SE along the same Δθ, and the lr up to which the step is linear (docs/math.md §5.6)."""

    delta_h2: float
    se_delta_h2: float
    delta_h1: float
    delta_h1_plus_h2: float
    eta_star: float | None
    step_multiplier_star: float | None
    fraction: float
    verdict: Literal["linear", "curved", "unresolved"]
    fd_eps: float
    ess_fraction_plus: float
    ess_fraction_minus: float


class RealisedStepRecord(Record):
    """The emulated step as the next forward sees it when the weights are stored in half precision (§4.9):
    Δθ_r = round(θ + Δθ) − θ in the weights' dtype, δH₁ along it, and how much of Δθ the rounding lost."""

    dtype: Literal["bfloat16", "float16"]
    delta_h1: float  # X̄ · Δθ_r
    fraction_lost: float  # ‖Δθ_r − Δθ‖ / ‖Δθ‖
    fraction_unmoved: float  # share of the elements with Δθ_i ≠ 0 that the rounding leaves where they were


class ReuseRecord(_Sparse):
    """Whether the samples were importance-weighted (drawn by another checkpoint) and their ESS (docs/math.md §5.4)."""

    weighted: bool
    sampler_fingerprint: dict[Literal["E", "U"], str]
    ess_fraction_E: float
    ess_fraction_U: float | None  # None: no U batch (update.rule observed)
    ess_E: float | None = None
    ess_U: float | None = None

    @classmethod
    def of(cls, sampler: dict[str, str], sizes: dict[str, int], ess: dict[str, float]) -> "ReuseRecord":
        """From who drew each batch ("E"/"U" -> fingerprint), the batch sizes and the ESS of the re-weighted
        batches (ESS/N = 1 for a batch the probed checkpoint drew; no "U": ess_fraction_U None)."""
        fractions = {"ess_fraction_U": None}
        fractions.update({f"ess_fraction_{k}": ess[k] / n if k in ess else 1.0 for k, n in sizes.items()})
        counts = {f"ess_{k}": v for k, v in ess.items()}
        return cls(weighted=bool(ess), sampler_fingerprint=sampler, **fractions, **counts)


class DeltaH1Report(JsonArtifact):
    FILE: ClassVar[str] = "delta_h1.json"
    STAGE: ClassVar[str] = "delta-h1"

    delta_h1: float
    delta_h1_from_tangents: float
    bars_dot: float
    learning_rate: float = Field(gt=0)  # mean over parameters of the lr Δθ includes
    entropy: float
    se_delta_h1: float
    se_E: float
    # U-dependent keys: None with update.rule observed (no U batch); se_U also when it cannot be estimated
    se_U: float | None = None
    se_U_note: str | None = None  # why se_U is None (rule observed, too few groups with a non-zero advantage)
    se_U_method: Literal["jackknife over U prompt groups", "delta method"] | None = None
    delta_h1_gradient_part: float | None = None
    delta_h1_momentum_part: float | None = None
    delta_h1_gradient_part_linearised: float | None = None
    delta_h1_naive: float | None = None
    se_E_naive: float | None = None
    cov_logp_advantage: float | None = None
    norm_xbar: float
    norm_delta_theta: float
    norm_g: float | None = None
    targets: dict[Target, TargetEstimate]
    B_E: int
    B_U: int | None = None
    G: int | None = None
    n_E_tokens: int
    n_U_tokens: int | None = None
    estimator: EstimatorRecord
    update: UpdateRecord
    checkpoint_fingerprint: str
    reuse: ReuseRecord
    world_size: int
    shard: Literal["none", "fsdp"] = "none"  # how the processes held the policy (compute.shard)
    second_order: SecondOrderRecord | None = None  # δH₂ along the same Δθ, when delta-h1 computed it
    realised_step: RealisedStepRecord | None = None  # half-precision weights, emulated rules only

    @field_validator("targets")
    @classmethod
    def _targets_in_order(cls, targets: dict) -> dict:
        """The targets computed (all three with compute.all_targets, else the configured one), in TARGETS order."""
        return {t: targets[t] for t in TARGETS if t in targets}

    @model_validator(mode="after")
    def _configured_target_present(self) -> "DeltaH1Report":
        if self.estimator.entropy not in self.targets:
            raise ValueError(f"no entry for the configured target '{self.estimator.entropy}'")
        return self

    @model_validator(mode="after")
    def _u_keys_follow_the_rule(self) -> "DeltaH1Report":
        """A U batch entered exactly when the rule is not observed: its keys are all there, or all absent."""
        u_keys = ("delta_h1_gradient_part", "delta_h1_momentum_part", "cov_logp_advantage", "norm_g", "B_U", "G")
        u_keys += ("n_U_tokens",)
        present = [k for k in u_keys if getattr(self, k) is not None]
        observed = self.update.rule == "observed"
        if observed and (present or self.se_U is not None or self.reuse.ess_fraction_U is not None):
            raise ValueError(f"rule observed has no U batch, but {(present or ['se_U'])[0]} is set")
        if not observed and len(present) != len(u_keys):
            raise ValueError(f"rule {self.update.rule} needs {sorted(set(u_keys) - set(present))[0]}")
        if not observed and self.se_U is None and self.se_U_note is None:
            raise ValueError("se_U is null without se_U_note saying why")
        return self

    @property
    def observed(self) -> bool:
        """Δθ is the trainer's own step to the next checkpoint (no U batch, no SE_U)."""
        return self.update.rule == "observed"

    @property
    def target(self) -> str:
        """The configured entropy target (the one δH₁, X̄ and the SEs at the top level are for)."""
        return self.estimator.entropy

    def check_checkpoint(self, fingerprint: str, where: str, fix: str) -> None:
        """Refuse a report computed for another checkpoint than `fingerprint`; `where` names it ("checkpoint.path
        X is", "data/verify describes")."""
        if self.checkpoint_fingerprint != fingerprint:
            raise ProbeError(
                f"delta_h1.json is for checkpoint {self.checkpoint_fingerprint}, but {where} {fingerprint}", fix
            )


@dataclass(eq=False)
class Bars:
    """bars.safetensors: X̄ and Δθ per trainable parameter name (the same names, shapes), lr and target."""

    xbar: dict[str, torch.Tensor]
    delta_theta: dict[str, torch.Tensor]
    learning_rate: float
    target: str

    def write(self, directory: str | Path) -> Path:
        problem = self.problem()
        if problem is not None:  # the stage built it: a bug, not user input
            raise RuntimeError(f"delta-h1 produced malformed bars: {problem}")
        path = Path(directory) / BARS_FILE
        tensors = {
            **{f"xbar.{n}": t for n, t in self.xbar.items()},
            **{f"delta_theta.{n}": t.float() for n, t in self.delta_theta.items()},
        }
        write_tensors(path, tensors, kind=BARS_KIND, meta={"learning_rate": self.learning_rate, "target": self.target})
        return path

    @classmethod
    def read(cls, directory: str | Path) -> "Bars":
        """Read and validate (kind, schema, names, shapes, dtypes, finite Δθ, lr > 0); one-line ProbeError if not."""
        path = Path(directory) / BARS_FILE
        tensors, meta = read_tensors(path, BARS_KIND)
        parts: dict[str, dict[str, torch.Tensor]] = {"xbar": {}, "delta_theta": {}}
        for key, t in tensors.items():
            kind, _, name = key.partition(".")
            if kind not in parts or not name:
                raise _malformed(path, f"unexpected tensor '{key}'")
            parts[kind][name] = t
        lr, target = meta.get("learning_rate"), meta.get("target")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool):
            raise _malformed(path, f"metadata learning_rate is {lr!r}")
        bars = cls(parts["xbar"], parts["delta_theta"], float(lr), target)
        problem = bars.problem()
        if problem is not None:
            raise _malformed(path, problem)
        return bars

    def problem(self) -> str | None:
        """The first inconsistency, as text; None when the bars are consistent."""
        if not self.delta_theta:
            return "no delta_theta.* tensors"
        if list(self.xbar) != list(self.delta_theta):
            return "xbar.* and delta_theta.* name different parameters"
        for name, d in self.delta_theta.items():
            x = self.xbar[name]
            if not (x.is_floating_point() and d.is_floating_point()) or x.shape != d.shape:
                return f"xbar/delta_theta of '{name}' are {x.dtype} {tuple(x.shape)} / {d.dtype} {tuple(d.shape)}"
            if not d.isfinite().all():
                return f"Δθ of '{name}' has non-finite entries"
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            return f"learning_rate {self.learning_rate} is not a positive number"
        if self.target not in TARGETS:
            return f"unknown entropy target {self.target!r}"
        return None

    def check_fits(self, model) -> None:
        """Refuse a Δθ the model cannot take: a parameter it lacks, or another shape."""
        params = dict(model.named_parameters())
        for name, d in self.delta_theta.items():
            if name not in params:
                raise ProbeError(f"Δθ names parameter '{name}', which the model lacks", RERUN_FOR_CHECKPOINT)
            if tuple(d.shape) != tuple(params[name].shape):
                raise ProbeError(
                    f"Δθ for '{name}' has shape {tuple(d.shape)}, the parameter {tuple(params[name].shape)}",
                    RERUN_FOR_CHECKPOINT,
                )


def _malformed(path: Path, problem: str) -> ProbeError:
    return ProbeError(f"{path} is not a valid bars file of this version ({problem})", RERUN)


def attributions_csv(
    u_attribution: list[float] | None,
    e_contribution: list[float],
    U,
    E,
    tokenizer,
    u_attribution_loo: list[float] | None = None,
) -> str:
    """attributions.csv text: every U prompt group and E sequence, U first, most entropy-lowering first (U groups
    by their leave-one-group-out attribution when given: under gradient clipping the linearised one is ~0).

    U, E: the sample artifacts (`artifacts.samples.Samples`); a U row shows its group's responses → rewards.
    u_attribution None (and U None): no U batch (update.rule observed), E rows only. u_attribution_loo: the
    groups' leave-one-group-out attributions (same order), written as contribution_loo (else left empty).
    """
    from .samples import decode_responses

    def prompt(samples, i: int) -> str:
        return tokenizer.decode(samples.input_ids[i, : samples.n_prompt_cols].tolist(), skip_special_tokens=True)

    rows = []
    if u_attribution is not None:
        responses = decode_responses(tokenizer, U.tensors())
        rewards = U.rewards.tolist()
        members_of: dict[int, list[int]] = {}
        for i, b in enumerate(U.group_index.tolist()):
            members_of.setdefault(b, []).append(i)
        loo = [""] * len(u_attribution) if u_attribution_loo is None else u_attribution_loo
        for b, contribution in enumerate(u_attribution):
            members = members_of[b]
            shown = " | ".join(f"{responses[i]!r}→{rewards[i]:g}" for i in members)
            rows.append(["U", b, int(U.prompt_index[members[0]]), contribution, prompt(U, members[0]), shown, loo[b]])
    e_responses = decode_responses(tokenizer, E.tensors())
    for i, contribution in enumerate(e_contribution):
        rows.append(["E", i, int(E.prompt_index[i]), contribution, prompt(E, i), repr(e_responses[i]), ""])
    rows.sort(key=lambda r: (r[0] != "U", r[6] if r[6] != "" else r[3]))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["batch", "index", "prompt_index", "contribution", "prompt", "responses", "contribution_loo"])
    writer.writerows(rows)
    return buf.getvalue()


__all__ = [
    "ATTRIBUTIONS_FILE",
    "BARS_FILE",
    "Bars",
    "DeltaH1Report",
    "EstimatorRecord",
    "ObservedRecord",
    "ReuseRecord",
    "SecondOrderRecord",
    "Target",
    "TargetEstimate",
    "UpdateRecord",
    "attributions_csv",
]
