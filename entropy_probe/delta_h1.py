"""The delta-h1 stage: δH₁ = X̄ · Δθ from artifacts, with standard errors and attributions.

Passes over the data (each in token-budget microbatches, SPEC §3):
  1. U, reverse:  g = ∇J = ∇ Σ c_ij logp_ij                       (policy gradient of the U batch)
  2.              Δθ = update(g)                                   (adam_step | adam_precond | sgd)
  3. E, reverse + double-backward: X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik) and, for every E
     token, dH_ik = ∇H_ik·Δθ and dlogp_ik = ∇logp_ik·Δθ. Every target's δH₁ and SE_E are weighted
     sums of those tangents (`EntropyCoefs.estimate`), so one pass serves all three targets.
  4. U, one ordinary backward with `RowDirectional` hooks: row_i = Σ_j c_ij ∇logp_ij · u along
     u = (∂Δθ/∂g)ᵀ X̄ (the update's linearisation in g), giving per-prompt-group attributions and SE_U.
No per-sample parameter-sized gradient is ever formed.

Under torchrun (`entropy_probe.distributed`) every process loads the model and the whole (small) artifacts, runs
each pass over its contiguous share of the rows (`Batch.shard`) and all-reduces the sums — g, X̄, the
per-token tangents and the re-scored statistics — so every process ends with the one-process results
(up to float32 summation order); the coefficients come from the full batch on every process; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed, files, outputs
from .errors import ProbeError
from .estimators import TARGETS, EntropyCoefs, entropy_coefficients, importance_weights, naive_coefficients
from .params import Params
from .policy import teacher_force, token_budget_slices
from .tangents import RowDirectional, grad_and_tangents
from .update import (
    AdamState,
    FlatLayout,
    linearise,
    pg_coefficients,
    group_terms_from_rows,
    resolve_loss_agg_mode,
    update_direction,
    zero_gradient_part,
)

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A sample artifact on the compute device (see docs/design.md for the fields)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # [N, R] response mask
    n_prompt_cols: int
    temperature: float
    top_p: float
    tensors: dict = field(repr=False)  # everything else in the artifact (logprobs, entropies, rewards, …)
    # under torchrun: this process's contiguous share of the rows; the passes visit only these rows and
    # all-reduce their sums (`reduce`), so every process ends with the whole batch's results. None = all rows.
    shard: slice | None = None

    @classmethod
    def from_artifact(cls, tensors: dict, meta: dict, device: torch.device) -> "Batch":
        from .sampling import response_mask

        n_resp = tensors["logprobs"].shape[1]
        mask = response_mask(tensors)
        gen = meta["generation"]
        return cls(
            input_ids=tensors["input_ids"].to(device),
            attention_mask=tensors["attention_mask"].to(device),
            mask=mask.to(device),
            n_prompt_cols=tensors["input_ids"].shape[1] - n_resp,
            temperature=float(gen["temperature"]),
            top_p=float(gen["top_p"]),
            tensors={k: v.to(device) for k, v in tensors.items()},
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def score(self, model, rows: slice, entropies: bool = True):
        """Teacher-forced TokenStats (with graph) for a microbatch of rows; features come from the artifact."""
        return teacher_force(
            model,
            self.input_ids[rows],
            self.attention_mask[rows],
            self.n_prompt_cols,
            self.mask[rows],
            self.temperature,
            self.top_p,
            with_grad=True,
            entropies=entropies,
            features=False,
        )

    def slices(self, max_tokens: int) -> list[slice]:
        """Token-budget microbatches (row ranges) over this process's rows (all rows unless sharded)."""
        if self.shard is None:
            return token_budget_slices(len(self), self.input_ids.shape[1], max_tokens)
        start, stop, _ = self.shard.indices(len(self))
        local = token_budget_slices(max(0, stop - start), self.input_ids.shape[1], max_tokens)
        return [slice(start + s.start, start + s.stop) for s in local]

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: Σ over the processes that share this batch (identity unless sharded)."""
        return tensor if self.shard is None else distributed.all_reduce_sum(tensor)


# ---------------------------------------------------------------------------------------------
# the passes


def policy_gradient(model, params, layout: FlatLayout, U: Batch, coef: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """g = ∇_θ Σ_ij coef_ij logp_ij over U, as a flat float32 vector."""
    g = torch.zeros(layout.numel, dtype=torch.float32, device=coef.device)
    for rows in tqdm(U.slices(max_tokens), desc="U gradient", leave=False, disable=None):
        stats = U.score(model, rows, entropies=False)
        grads, _ = grad_and_tangents([stats.logprobs], [coef[rows]], params, None)
        g += torch.cat([x.reshape(-1).float() for x in grads])
    return U.reduce(g)


def entropy_pass(model, params, layout, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int):
    """(X̄ flat float32, dH [N,R], dlogp [N,R]) with X̄ = ∇ Σ_i w_i Σ_k (a H + c logp), tangents along direction."""
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).float(), (coefs.c * w).float()
    xbar = torch.zeros(layout.numel, dtype=torch.float32, device=a.device)
    dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows in tqdm(E.slices(max_tokens), desc="E gradient", leave=False, disable=None):
        stats = E.score(model, rows)
        grads, (dH[rows], dlogp[rows]) = grad_and_tangents(
            [stats.entropies, stats.logprobs], [a[rows], c[rows]], params, direction
        )
        xbar += torch.cat([x.reshape(-1).float() for x in grads])
    return E.reduce(xbar), E.reduce(dH), E.reduce(dlogp)  # tangents: rows of other shards are 0 here


def u_row_terms(model, params, names: list[str], U: Batch, coef: torch.Tensor, direction, max_tokens: int):
    """row_i = Σ_j coef_ij ∇logp_ij · direction for every U row, [N] — all the U attributions need.

    One ordinary backward per microbatch with `RowDirectional` hooks when every trainable parameter is a
    Linear weight/bias (LoRA); otherwise per-token tangents by double backward, summed with coef.
    """
    rows_out = torch.zeros(len(U), dtype=torch.float32, device=coef.device)
    row_dots = RowDirectional.supports(model, names)
    hooks = RowDirectional(model, names, direction) if row_dots else contextlib.nullcontext()
    with hooks:
        for rows in tqdm(U.slices(max_tokens), desc="U tangents", leave=False, disable=None):
            stats = U.score(model, rows, entropies=False)
            if row_dots:
                torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef[rows]], allow_unused=True)
                taken = hooks.take()  # None: no hooked layer is on the path to these log-probs
                rows_out[rows] = 0.0 if taken is None else taken
            else:
                _, (dlogp,) = grad_and_tangents([stats.logprobs], [U.mask[rows].float()], params, direction)
                rows_out[rows] = (coef[rows] * dlogp).sum(-1)
    return U.reduce(rows_out)


@torch.no_grad()
def rescore(model, batch: Batch, max_tokens: int) -> torch.Tensor:
    """Re-score `batch` under `model` (no grad); replace its per-token statistics in place.

    Returns log π_model(y) − log π_behaviour(y) per sequence, the log importance ratio of cached samples.
    """
    stats = {k: torch.zeros_like(batch.tensors[k]) for k in ("logprobs", "entropies", "top1_prob", "margin")}
    for rows in tqdm(batch.slices(max_tokens), desc="re-score", leave=False, disable=None):
        out = teacher_force(
            model, batch.input_ids[rows], batch.attention_mask[rows], batch.n_prompt_cols, batch.mask[rows],
            batch.temperature, batch.top_p,
        )  # fmt: skip
        for k in stats:
            stats[k][rows] = getattr(out, k).to(stats[k].dtype)
    for k in stats:
        batch.reduce(stats[k])
    log_ratio = (stats["logprobs"].double() - batch.tensors["logprobs"].double()).sum(-1)
    batch.tensors.update(stats)
    return log_ratio


def token_advantage_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Cui et al. (2025) diagnostic: Cov(log π(y_t), A_t) over the U batch's response tokens."""
    logp = logprobs[mask].double()
    adv = advantages.unsqueeze(1).expand_as(mask)[mask].double()
    return ((logp - logp.mean()) * (adv - adv.mean())).mean().item()


# ---------------------------------------------------------------------------------------------
# the whole computation, on in-memory batches


@dataclass
class UpdateSpec:
    rule: str
    state: AdamState
    max_grad_norm: float | None
    loss_agg_mode: str
    max_len: int | None


def compute_delta_h1(
    model,
    E: Batch,
    U: Batch,
    layout: FlatLayout,
    spec: UpdateSpec,
    estimator,
    max_tokens: int,
    e_weights: torch.Tensor | None = None,
    u_weights: torch.Tensor | None = None,
) -> dict:
    """Every number of delta_h1.json plus the flat X̄ and Δθ (keys `xbar`, `delta_theta`) and attributions.

    e_weights: self-normalised importance weights of the E sequences (sum 1; None = uniform);
    u_weights: those of the U sequences scaled to mean 1 (None = all 1). Both are None when the probed
    checkpoint drew the samples, which makes this the plain, unweighted computation.
    """
    params = dict(model.named_parameters())
    params = [params[n] for n in layout.names]
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - start, 4)
        return out

    advantages = U.tensors["advantages"].float()
    pg_coef = pg_coefficients(advantages, U.mask, spec.loss_agg_mode, spec.max_len, u_weights).float()
    g = timed("u_gradient", policy_gradient, model, params, layout, U, pg_coef, max_tokens)

    start = time.perf_counter()
    delta_theta = update_direction(spec.rule, g.double(), spec.state, spec.max_grad_norm)
    delta_zero = zero_gradient_part(spec.rule, spec.state, spec.max_grad_norm)
    timings["update"] = round(time.perf_counter() - start, 4)
    direction = [d.to(p.dtype) for d, p in zip(layout.unflatten(delta_theta.float()).values(), params)]

    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], dim=-1).float()
    coefs = {
        t: entropy_coefficients(
            E.tensors["entropies"].float(),
            E.mask,
            target=t,
            baseline=estimator.baseline,
            features=features,
            ridge=estimator.ridge,
            folds=estimator.crossfit_folds,
            weights=e_weights,
        )
        for t in TARGETS
    }
    main = coefs[estimator.entropy]
    xbar, dH, dlogp = timed("e_gradient", entropy_pass, model, params, layout, E, main, direction, max_tokens)

    start = time.perf_counter()
    u = linearise(spec.rule, g.double(), xbar.double(), spec.state, spec.max_grad_norm)
    timings["linearise"] = round(time.perf_counter() - start, 4)
    u_dir = [d.to(p.dtype) for d, p in zip(layout.unflatten(u.float()).values(), params)]
    row_terms = timed("u_tangents", u_row_terms, model, params, layout.names, U, pg_coef, u_dir, max_tokens)
    attribution, influence = group_terms_from_rows(
        row_terms, U.mask, U.tensors["group_index"], spec.loss_agg_mode, u_weights
    )

    delta_h1 = float((xbar.double() * delta_theta).sum())
    momentum_part = float((xbar.double() * delta_zero).sum())
    per_target = {}
    for t, cf in coefs.items():
        est, se_e = cf.estimate(dH, dlogp)
        per_target[t] = {"delta_h1": est, "se_E": se_e, "entropy": cf.entropy}
    naive = naive_coefficients(E.tensors["logprobs"].float(), E.mask, target=estimator.entropy, weights=e_weights)
    naive_est, naive_se = naive.estimate(None, dlogp)
    se_e = per_target[estimator.entropy]["se_E"]
    se_u = influence.std().item() / len(influence) ** 0.5 if len(influence) > 1 else float("nan")
    se_total = (se_e**2 + se_u**2) ** 0.5
    per_target[estimator.entropy].update(se_U=se_u, se_delta_h1=se_total)
    lr_mean = float(spec.state.lr.mean())
    return {
        "delta_h1": delta_h1,
        "delta_h1_from_tangents": per_target[estimator.entropy]["delta_h1"],
        "bars_dot": delta_h1 / lr_mean,
        "learning_rate": lr_mean,
        "entropy": main.entropy,
        "se_delta_h1": se_total,
        "se_E": se_e,
        "se_U": se_u,
        "delta_h1_gradient_part": delta_h1 - momentum_part,
        "delta_h1_momentum_part": momentum_part,
        "delta_h1_gradient_part_linearised": float(attribution.sum()),
        "delta_h1_naive": naive_est,
        "se_E_naive": naive_se,
        "cov_logp_advantage": token_advantage_covariance(U.tensors["logprobs"], advantages, U.mask),
        "norm_xbar": float(xbar.double().norm()),
        "norm_delta_theta": float(delta_theta.norm()),
        "norm_g": float(g.double().norm()),
        "targets": per_target,
        "timings": timings,
        "xbar": xbar,
        "delta_theta": delta_theta,
        "e_contributions": main.influence(dH, dlogp) / len(E),
        "u_attribution": attribution,
    }


# ---------------------------------------------------------------------------------------------
# the stage


def _attributions_csv(result: dict, E: Batch, U: Batch, tokenizer) -> str:
    """Rows for every U prompt group and every E sequence, sorted by contribution (most negative first)."""
    from .sampling import decode_responses

    def text(batch: Batch, i: int) -> tuple[str, str]:
        ids = batch.input_ids[i].tolist()
        prompt = tokenizer.decode(ids[: batch.n_prompt_cols], skip_special_tokens=True)
        return prompt, responses[batch is U][i]

    responses = {False: decode_responses(tokenizer, E.tensors), True: decode_responses(tokenizer, U.tensors)}
    rows = []
    rewards = U.tensors["rewards"].tolist()
    members_of: dict[int, list[int]] = {}
    for i, b in enumerate(U.tensors["group_index"].tolist()):
        members_of.setdefault(b, []).append(i)
    for b, contrib in enumerate(result["u_attribution"].tolist()):
        members = members_of[b]
        prompt, _ = text(U, members[0])
        shown = " | ".join(f"{text(U, i)[1]!r}→{rewards[i]:g}" for i in members)
        rows.append(["U", b, int(U.tensors["prompt_index"][members[0]]), contrib, prompt, shown])
    for i, contrib in enumerate(result["e_contributions"].tolist()):
        prompt, response = text(E, i)
        rows.append(["E", i, int(E.tensors["prompt_index"][i]), contrib, prompt, repr(response)])
    rows.sort(key=lambda r: (r[0] != "U", r[3]))  # U groups first, most entropy-lowering first
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["batch", "index", "prompt_index", "contribution", "prompt", "responses"])
    writer.writerows(rows)
    return buf.getvalue()


def _reweight(model, E: Batch, U: Batch, E_meta: dict, U_meta: dict, fingerprint: str, params: Params):
    """(reuse report, E weights, U weights) for cached samples; (…, None, None) when this checkpoint drew them.

    Samples drawn by another checkpoint are re-scored under this one and weighted per sequence by the
    self-normalised ratio π_probed(y)/π_behaviour(y); below `reuse.min_ess_fraction` this refuses unless forced.
    """
    load = {"dtype": params.checkpoint.dtype, "use_qlora": params.checkpoint.use_qlora}
    sampler = {"E": E_meta.get("checkpoint_fingerprint"), "U": U_meta.get("checkpoint_fingerprint")}
    # the same files loaded another way (4-bit, another dtype) are a slightly different policy
    same = {k: sampler[k] == fingerprint and meta.get("load", load) == load for k, meta in (("E", E_meta), ("U", U_meta))}
    reuse = {"weighted": False, "sampler_fingerprint": sampler, "ess_fraction_E": 1.0, "ess_fraction_U": 1.0}
    if same["E"] and same["U"]:
        return reuse, None, None  # weights are exactly 1: the plain computation
    weights = {}
    for name, batch in (("E", E), ("U", U)):
        if same[name]:
            weights[name] = None
            continue
        w, ess = importance_weights(rescore(model, batch, params.compute.max_tokens_per_microbatch))
        fraction = ess / len(batch)
        reuse.update({"weighted": True, f"ess_{name}": ess, f"ess_fraction_{name}": fraction})
        log.info("delta-h1: %s samples drawn by checkpoint %s; importance-weighted, ESS/N = %.3f", name, sampler[name], fraction)
        if fraction < params.reuse.min_ess_fraction and not params.reuse.force:
            raise ProbeError(
                f"the {name} samples (drawn by checkpoint {sampler[name]}) have ESS/N = {fraction:.3f} under this "
                f"checkpoint, below reuse.min_ess_fraction = {params.reuse.min_ess_fraction}",
                "re-sample with this checkpoint (sampling.checkpoint), or set reuse.force: true to compute anyway",
            )
        weights[name] = w.float() if name == "E" else (w * len(batch)).float()
    return reuse, weights["E"], weights["U"]


HF_DEFAULT_MAX_GRAD_NORM = 1.0  # transformers.TrainingArguments.max_grad_norm


def _max_grad_norm(setting, report: dict) -> tuple[float | None, str]:
    """(max_grad_norm, where it came from): `auto` takes the trainer's, else the HF Trainer default."""
    if setting != "auto":
        return setting, "update.max_grad_norm"
    if report.get("max_grad_norm") is not None:
        return report["max_grad_norm"], "the trainer's max_grad_norm"
    return HF_DEFAULT_MAX_GRAD_NORM, (
        f"default {HF_DEFAULT_MAX_GRAD_NORM} (the trainer's is not recorded: set update.max_grad_norm, write "
        "trainer_config.json beside the checkpoint, or set checkpoint.trust_pickles for a checkpoint you trust)"
    )


def run(params: Params, out_dir: Path, dry_run: bool) -> None:
    from .checkpoint import checkpoint_fingerprint, load_policy_model, load_tokenizer, resolve_paths
    from .sampling import check_samples_fit_model, load_samples
    from .verify import read_verify

    E_t, E_meta = load_samples(params.paths.sample_e, "samples_e")
    U_t, U_meta = load_samples(params.paths.sample_u, "samples_u")
    report, opt = read_verify(params.paths.verify)
    mode, max_len, why = resolve_loss_agg_mode(params.update.loss_agg_mode, report.get("trainer_config") or {})
    max_grad_norm, clip_source = _max_grad_norm(params.update.max_grad_norm, report)
    log.info("delta-h1: gradient clipping at %s from %s", max_grad_norm, clip_source)
    if not U_t["advantages"].any():
        raise ProbeError(
            "every U group has all-equal rewards (all advantages are 0), so the update has no policy gradient",
            "sample more or harder U prompts (batch_config.B_U, batch_config.G), or check the reward function",
        )
    log.info(
        "delta-h1: E %d sequences, U %d sequences (%d groups); target %s, baseline %s; rule %s, loss %s (%s)",
        len(E_t["input_ids"]), len(U_t["input_ids"]), int(U_t["group_index"].max()) + 1,
        params.estimator.entropy, params.estimator.baseline, params.update.rule, mode, why,
    )
    if dry_run:
        return
    trainer = report.get("trainer_config") or {}
    if trainer.get("beta"):
        log.warning("delta-h1: the trainer used a KL penalty (beta=%s); J here is the policy-gradient term only", trainer["beta"])

    start = time.perf_counter()
    paths = resolve_paths(params.checkpoint)
    if checkpoint_fingerprint(paths) != report["fingerprint"]:
        raise ProbeError(
            f"checkpoint.path {params.checkpoint.path} is not the checkpoint verify described ({report['fingerprint']})",
            "rerun the verify stage for this checkpoint (dvc repro)",
        )
    model = load_policy_model(params.checkpoint, paths)
    tokenizer = load_tokenizer(paths)
    check_samples_fit_model(E_t, E_meta, params.paths.sample_e, model, tokenizer)
    check_samples_fit_model(U_t, U_meta, params.paths.sample_u, model, tokenizer)
    load_seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    E = Batch.from_artifact(E_t, E_meta, device)
    U = Batch.from_artifact(U_t, U_meta, device)
    world = distributed.world_size()
    if world > 1:  # torchrun: every process scores its contiguous share of E and of U; sums are all-reduced
        E.shard = distributed.row_slice(len(E), distributed.rank(), world)
        U.shard = distributed.row_slice(len(U), distributed.rank(), world)
        log.info("delta-h1: rank %d of %d: E rows %d..%d, U rows %d..%d", distributed.rank(), world,
                 E.shard.start, E.shard.stop - 1, U.shard.start, U.shard.stop - 1)  # fmt: skip
    reuse, e_weights, u_weights = _reweight(model, E, U, E_meta, U_meta, report["fingerprint"], params)

    named = dict(model.named_parameters())
    layout = FlatLayout.from_named(named, opt.names)
    state = AdamState.from_groups(
        layout,
        {n: named[n].detach() for n in opt.names},
        opt.exp_avg,
        opt.exp_avg_sq,
        opt.step,
        opt.groups,
        # "next" keeps each param group's own lr; "last" or a number applies one lr to every group
        lr=None if report.get("learning_rate_setting") == "next" else float(report["learning_rate"]),
    )
    spec = UpdateSpec(params.update.rule, state, max_grad_norm, mode, max_len)
    result = compute_delta_h1(
        model, E, U, layout, spec, params.estimator, params.compute.max_tokens_per_microbatch, e_weights, u_weights
    )
    result["timings"]["load_model"] = round(load_seconds, 4)

    log.info("delta-h1: phase seconds %s", result["timings"])
    # no timings in delta_h1.json: exact, truth and report depend on it, and a re-run must not change it
    summary = {
        k: v
        for k, v in result.items()
        if k not in ("xbar", "delta_theta", "e_contributions", "u_attribution", "timings")
    }
    summary.update(
        B_E=len(E),
        B_U=int(U.tensors["group_index"].max()) + 1,
        G=int(U_meta.get("G", 0)),
        n_E_tokens=int(E.mask.sum()),
        n_U_tokens=int(U.mask.sum()),
        estimator=params.estimator.model_dump(),
        update={"rule": spec.rule, "loss_agg_mode": mode, "loss_agg_reason": why, "max_len": max_len,
                "max_grad_norm": max_grad_norm, "max_grad_norm_source": clip_source},
        checkpoint_fingerprint=report["fingerprint"],
        reuse=reuse,
        world_size=world,
    )
    # every process holds the same results now; rank 0 writes them (an error there is raised on every rank)
    distributed.on_rank0(lambda: _write_outputs(out_dir, summary, result, layout, params, E, U, tokenizer))


def _write_outputs(
    out_dir: Path, summary: dict, result: dict, layout: FlatLayout, params: Params, E: Batch, U: Batch, tokenizer
) -> None:
    """delta_h1.json, bars.safetensors and attributions.csv, atomically; then the log summary."""
    with outputs.staged_output_dir(out_dir) as tmp:
        files.write_tensors(
            tmp / "bars.safetensors",
            {**{f"xbar.{n}": t for n, t in layout.unflatten(result["xbar"]).items()},
             **{f"delta_theta.{n}": t.float() for n, t in layout.unflatten(result["delta_theta"]).items()}},
            kind="bars",
            meta={"learning_rate": summary["learning_rate"], "target": params.estimator.entropy},
        )
        files.write_json(tmp / "delta_h1.json", summary)
        files.write_text(tmp / "attributions.csv", _attributions_csv(result, E, U, tokenizer))
    _print_summary(summary, result, U)


def _print_summary(summary: dict, result: dict, U: Batch) -> None:
    log.info(
        "δH₁ = %.4g ± %.2g (SE_E %.2g, SE_U %.2g); entropy %.4g; gradient part %.4g, momentum/decay part %.4g",
        summary["delta_h1"], summary["se_delta_h1"], summary["se_E"], summary["se_U"], summary["entropy"],
        summary["delta_h1_gradient_part"], summary["delta_h1_momentum_part"],
    )
    order = result["u_attribution"].argsort()
    top = [int(i) for i in order[:3]], [int(i) for i in order.flip(0)[:3]]
    log.info("U groups lowering entropy most: %s", ", ".join(f"#{b} ({result['u_attribution'][b]:.3g})" for b in top[0]))
    log.info("U groups raising entropy most: %s", ", ".join(f"#{b} ({result['u_attribution'][b]:.3g})" for b in top[1]))
