"""`Probe`: one loaded checkpoint and everything the probe computes on it, in memory.

    from entropy_probe import Probe
    probe = Probe.from_checkpoint("data/demo/run/checkpoint-6")
    E, U = probe.sample_e(256), probe.sample_u(8)
    result = probe.delta_h1(E, U)                 # δH₁ ± SE, δH₂, attributions (typed: `DeltaH1Result`)
    result.save("out/delta_h1")                   # the delta-h1 stage's artifacts, byte for byte

The stages are thin callers of this class, so a notebook, the trainer callback and `dvc repro` compute
the same numbers the same way. Knobs come from a `Params` (params.yaml's defaults unless given); the
checkpoint's own settings (trainer, AdamW state, lr) are resolved once, here.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, sharded, task
from .artifacts.delta_h1 import (
    ATTRIBUTIONS_FILE,
    Bars,
    DeltaH1Report,
    ObservedRecord,
    RealisedStepRecord,
    ReuseRecord,
    SecondOrderRecord,
    attributions_csv,
)
from .artifacts.exact import ExactReport
from .artifacts.samples import Samples
from .artifacts.truth import TruthReport
from .checkpoint import load_reference_model
from .delta_h1 import DeltaH1Estimate, compute_delta_h1
from .errors import ProbeError
from .files import write_text
from .forecast import (
    NO_GROUP_GRADIENTS,
    Forecast,
    TrainerDraws,
    check_pool,
    resample_groups,
    simulate_trainer_draws,
    simulate_trainer_draws_shared,
)
from .forecast import summarise as summarise_forecast
from .generation import make_plan
from .importance import Reuse, reuse_weights
from .optimizer_state import OptimizerState, choose_learning_rate, learning_rate_next
from .outputs import staged_output_dir
from .params import Params
from .sampling import SamplerInfo, draw, sampler_info
from .scoring import Batch
from .second_order import second_order, shifted_estimates, taylor_rows
from .sharded import local_tensor
from .specs import ComputeBudget, SecondOrderSpec
from .trainer_config import TrainerSettings
from .update import FlatLayout, realised_step
from .update_rule import ObservedStep, UpdateRule, flat_state, resolve_update_rule
from .whatif import what_if
from .whatif_result import WhatIfResult
from .whatif_result import build as build_whatif

log = logging.getLogger(__name__)

IN_MEMORY = "in-memory"
# the shared finite difference of the forecast holds all K steps Δθ_S (float64); above this, one draw at a time
SHARED_DRAW_BYTES = 2 << 30  # the fingerprint of a probe built from live objects (no checkpoint files)


@dataclass
class DeltaH1Result:
    """One δH₁ computation: delta_h1.json (`report`), X̄ and Δθ per parameter (`bars`), attributions.csv
    (`attributions`) and the estimate's tensors (`estimate`: flat X̄, Δθ, per-row contributions)."""

    report: DeltaH1Report
    bars: Bars | None  # None on ranks other than 0 of a sharded run (compute.shard fsdp: rank 0 writes)
    attributions: str
    estimate: DeltaH1Estimate | None  # None for a result read from files

    @property
    def delta_h1(self) -> float:
        return self.report.delta_h1

    @property
    def se(self) -> float:
        """The total SE √(SE_E² + SE_U²) (SE_E alone when SE_U is not estimable or the step is given)."""
        return self.report.se_delta_h1

    @property
    def second_order(self) -> SecondOrderRecord | None:
        return self.report.second_order

    @classmethod
    def read(cls, directory: str | Path) -> DeltaH1Result:
        """A result the delta-h1 stage (or `save`) wrote: report, bars and attributions (no estimate tensors)."""
        directory = Path(directory)
        attributions = directory / ATTRIBUTIONS_FILE
        text = attributions.read_text() if attributions.is_file() else ""
        return cls(DeltaH1Report.read(directory), Bars.read(directory), text, None)

    def save(self, directory: str | Path) -> None:
        """Write delta_h1.json, bars.safetensors and attributions.csv into `directory`, all or nothing."""
        with staged_output_dir(directory) as tmp:
            self.bars.write(tmp)
            self.report.write(tmp)
            write_text(tmp / ATTRIBUTIONS_FILE, self.attributions)

    def __repr__(self) -> str:
        r = self.report
        return (
            f"DeltaH1Result(delta_h1={r.delta_h1:.4g}, se={r.se_delta_h1:.2g}, target={r.target}, rule={r.update.rule})"
        )


@dataclass
class ForecastResult:
    """`Probe.forecast`: the forecast (`Forecast`), its simulated trainer draws, and the pool's δH₁ result."""

    forecast: Forecast
    draws: TrainerDraws
    pool: DeltaH1Result


class Probe:
    """A policy with its AdamW state and trainer settings: samples E and U, computes δH₁ ± SE (and δH₂),
    the observed step, exact values and ground truth.

    `Probe(model, tokenizer, optimizer, trainer, params)` wraps objects already in memory (a notebook, a live
    trainer): `optimizer` is an `OptimizerState` (named AdamW state), `trainer` the trainer's settings
    (`TrainerSettings`; default: unknown), `reward` U's reward (default batch_config.reward_fn), `kl_reference`
    the KL penalty's reference model (default: checkpoint.kl_reference, or a LoRA policy with its adapter off).
    `Probe.from_checkpoint(path)` reads a checkpoint as verify does.
    """

    def __init__(
        self,
        model,
        tokenizer,
        optimizer: OptimizerState | None,
        trainer: TrainerSettings | None = None,
        params: Params | None = None,
        *,
        fingerprint: str = IN_MEMORY,
        paths=None,
        reward=None,
        kl_reference=None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.optimizer = optimizer  # None: a policy only (exact, truth), no update to emulate
        self.trainer = trainer or TrainerSettings()
        self.params = params if params is not None else Params()
        self.fingerprint = fingerprint
        self.paths = paths  # the checkpoint's files (None: in memory)
        self.reward = reward  # a task.BatchReward for U (e.g. the trainer's own); None: batch_config.reward_fn
        self._kl_reference = kl_reference  # see `kl_reference`
        self.layout = self.learning_rate = None
        if optimizer is not None:
            self.layout = FlatLayout.from_named(dict(model.named_parameters()), optimizer.names)
            lr_next, agree = learning_rate_next(optimizer)
            lr_last = self.trainer.learning_rate_last
            self.learning_rate = choose_learning_rate(self.params.checkpoint.learning_rate, lr_next, lr_last, agree)
        self._prompt_set = None

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_checkpoint(cls, path: str | Path, base_model: str | None = None, params: Params | None = None) -> Probe:
        """Load a checkpoint (base + adapter, AdamW state, trainer settings) as the verify stage does, with its
        checks; `params` (default: all defaults) gives every other knob, `path`/`base_model` override its
        checkpoint section."""
        from .checks import run_checks, scheduler_last_lrs
        from .sources import load_checkpoint

        params = (params or Params()).model_copy(deep=True)
        params.checkpoint.path = str(path)
        if base_model is not None:
            params.checkpoint.base_model = base_model
        ck = load_checkpoint(params.checkpoint)
        scheduler = scheduler_last_lrs(ck.paths.scheduler_path)
        _, warnings = run_checks(ck.model, ck.optimizer, ck.trainer, scheduler, params.checkpoint.use_checkpointing)
        for w in warnings:
            log.warning("checkpoint %s: %s", path, w)
        return cls(ck.model, ck.tokenizer, ck.optimizer, ck.trainer, params, fingerprint=ck.fingerprint, paths=ck.paths)

    @classmethod
    def policy(cls, params: Params) -> Probe:
        """The policy of params `checkpoint` without its AdamW state (for exact values and ground truth)."""
        from .sources import load_checkpoint

        ck = load_checkpoint(params.checkpoint, with_optimizer=False)
        return cls(ck.model, ck.tokenizer, None, ck.trainer, params, fingerprint=ck.fingerprint, paths=ck.paths)

    @classmethod
    def from_verify(cls, params: Params, verify_dir: str | Path | None = None) -> Probe:
        """The checkpoint verify described (its AdamW state and settings from verify's artifacts, never
        optimizer.pt again), refused unless `checkpoint.path` still is that checkpoint."""
        from .artifacts.verify import read_verify
        from .sources import source_for

        rows = sharded.moment_rows if params.compute.shard == "fsdp" and distributed.is_distributed() else None
        report, optimizer = read_verify(verify_dir if verify_dir is not None else params.paths.verify, rows)
        source = source_for(params.checkpoint)
        paths = source.resolve(params.checkpoint)
        if source.fingerprint(paths) != report.fingerprint:
            raise ProbeError(
                f"checkpoint.path {params.checkpoint.path} is not the checkpoint verify described ({report.fingerprint})",
                "rerun the verify stage for this checkpoint (dvc repro)",
            )
        params = params.model_copy(deep=True)
        params.checkpoint.learning_rate = report.learning_rate_setting
        trainer = TrainerSettings(
            report.trainer_config, report.trainer_config_source, report.global_step, report.learning_rate_last
        )
        # sharded: the whole policy in host memory, then each process's shards onto its device (`sharded.shard_policy`)
        load_on = params.checkpoint.model_copy(update={"device_map": "cpu"}) if params.compute.shard == "fsdp" else None
        model = source.load_model(load_on or params.checkpoint, paths)
        return cls(
            model, source.load_tokenizer(paths), optimizer, trainer, params, fingerprint=report.fingerprint, paths=paths
        )

    # ---------------------------------------------------------------------------------- properties

    @property
    def kl_reference(self):
        """The KL penalty's reference policy, a model: the one given (TRL's ref_model of a full-parameter run), else
        checkpoint.kl_reference loaded on first use; None: a LoRA policy's reference is its base, adapter off."""
        if self._kl_reference is None and self.params.checkpoint.kl_reference is not None:
            self._kl_reference = load_reference_model(self.params.checkpoint, self.model)
        return self._kl_reference

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def prompt_set(self) -> task.PromptSet:
        """The prompts of params `batch_config` (loaded once)."""
        if self._prompt_set is None:
            self._prompt_set = task.load_prompts(self.params.batch_config)
        return self._prompt_set

    @property
    def load(self) -> dict:
        """How the policy was loaded (samples drawn under another load are another policy's); for a model
        given in memory, the dtype it is in."""
        if self.paths is None:
            from .checkpoint import DTYPES

            dtype = next(p.dtype for p in self.model.parameters() if p.requires_grad)
            name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))
            four_bit = any(type(m).__name__ == "Linear4bit" for m in self.model.modules())  # bitsandbytes NF4 base
            return {"dtype": name, "use_qlora": four_bit}
        return {"dtype": self.params.checkpoint.dtype, "use_qlora": self.params.checkpoint.use_qlora}

    @property
    def budget(self) -> ComputeBudget:
        return ComputeBudget.of(self.params.compute)

    # ---------------------------------------------------------------------------------- sampling

    def sampler_info(self, kind: str) -> SamplerInfo:
        """This policy as the sampler of `kind` (samples_e | samples_u), as the samples record it."""
        path = IN_MEMORY if self.paths is None else self.params.checkpoint.path
        return sampler_info(self.params, self.trainer, self.fingerprint, kind, path, self.load)

    def _sample(self, kind: str, n: int | None, seed: int | None) -> Samples:
        self._refuse_if_sharded("sampling", "sample E and U before the first sharded delta_h1 (or run sample-e/u)")
        plan = distributed.on_rank0(lambda: make_plan(self.params, kind, len(self.prompt_set), n, seed))
        info = self.sampler_info(kind)
        return draw(self.params, self.model, self.tokenizer, plan, self.prompt_set, info, kind, self.reward)

    def sample_e(self, n: int | None = None, seed: int | None = None) -> Samples:
        """The E batch: n prompts (default batch_config.B_E) drawn with replacement, one response each."""
        return self._sample("samples_e", n, seed)

    def sample_u(self, n: int | None = None, seed: int | None = None) -> Samples:
        """The U batch: n distinct prompts (default batch_config.B_U), G responses each, rewards, advantages."""
        return self._sample("samples_u", n, seed)

    # ---------------------------------------------------------------------------------- the update

    def update_rule(self, rule: str | None = None) -> UpdateRule:
        """The next update under params `update` (or `rule` instead of update.rule), with this checkpoint's
        AdamW state, lr choice (checkpoint.learning_rate) and trainer settings."""
        update = self.params.update if rule is None else self.params.update.model_copy(update={"rule": rule})
        if update.rule == "observed":
            return self.observed_step(update.next_checkpoint)
        self._shard_if_asked()
        return resolve_update_rule(update, self.trainer.config.model_dump(), self._flat_state())

    def _shard_if_asked(self) -> None:
        """compute.shard fsdp (under torchrun): shard the policy with FSDP2 once, and cut the AdamW state and the
        layout to this process's shards (`sharded`); from then on this Probe computes δH₁ sharded."""
        if self.params.compute.shard != "fsdp" or sharded.is_sharded(self.model):
            return
        if self.optimizer is None:
            raise ProbeError("compute.shard fsdp shards the policy with its AdamW state, and this Probe has none",
                             "build it with from_checkpoint, or set compute.shard: none")  # fmt: skip
        sharded.check_supported(self.model, self.layout.names, self.params)
        if not distributed.is_distributed():
            raise ProbeError("compute.shard fsdp shards the policy over torchrun's processes, and this is one process",
                             "run under torchrun --nproc_per_node=N (N ≥ 2), or set compute.shard: none")  # fmt: skip
        sharded.shard_policy(self.model, self.params.checkpoint.device_map)
        self.optimizer = sharded.local_optimizer(self.optimizer, self.model)
        self.layout = sharded.local_layout(self.model, self.layout.names)

    def _flat_state(self):
        if self.optimizer is None:
            raise ProbeError("this Probe has no AdamW state, so it has no update", "build it with from_checkpoint")
        # "next" keeps each param group's own lr; "last" or a number applies one lr to every group
        lr = None if self.params.checkpoint.learning_rate == "next" else self.learning_rate
        return flat_state(self.optimizer, self.model, self.layout, lr)

    def observed_step(self, next_checkpoint: str | Path | None = None) -> UpdateRule:
        """The step the trainer took next: Δθ_obs = θ(next) − θ(this), `next_checkpoint` or the run's next
        checkpoint-N (docs/math.md §4.8)."""
        if self.paths is None:
            raise ProbeError("an observed step needs the checkpoint's files", "build the Probe with from_checkpoint")
        if self.params.compute.shard == "fsdp":
            raise ProbeError("compute.shard fsdp does not read an observed step", "set compute.shard: none")
        step = _observed_step(self.params.checkpoint, self.paths, next_checkpoint, self.layout, self.model)
        return UpdateRule("observed", self._flat_state(), observed=step)

    # ---------------------------------------------------------------------------------- δH₁ and δH₂

    def batch(self, samples: Samples) -> Batch:
        """A sample artifact on this policy's device (checked against its tokenizer and vocabulary); under
        torchrun this process's contiguous share of the rows."""
        samples.check_fits_model(self.model, self.tokenizer)
        batch = Batch.from_samples(samples, self.device, self.params.compute.logits_chunk_mb)
        world = distributed.world_size()
        if world > 1:
            batch.shard = distributed.row_slice(len(batch), distributed.rank(), world)
        batch.fsdp = sharded.is_sharded(self.model)
        if samples.kind == "samples_u" and self.kl_reference is not None:  # r of the KL penalty (reference_kl_slope)
            batch.tensors["reference_logprobs"] = self._reference_logprobs(batch)
        return batch

    def _reference_logprobs(self, U: Batch) -> torch.Tensor:
        """[N, R] log-probs of U's responses under the reference model, in eval mode (its mode restored after)."""
        reference = self.kl_reference
        training = reference.training
        try:
            budget = self.params.compute.max_tokens_per_microbatch
            return U.token_stats(reference.eval(), budget, "U reference log-probs")["logprobs"]
        finally:
            reference.train(training)

    def reuse(self, batches: dict[str, Batch], samples: dict[str, Samples]) -> Reuse:
        """Importance weights for the batches another policy drew: another checkpoint, or the same files
        loaded another way (4-bit, another dtype); none when this policy drew them all."""
        foreign = {
            name: s.meta.checkpoint_fingerprint
            for name, s in samples.items()
            if s.meta.checkpoint_fingerprint != self.fingerprint or s.meta.load.model_dump() != self.load
        }
        if not foreign:
            return Reuse(None, None)
        r, max_tokens = self.params.reuse, self.params.compute.max_tokens_per_microbatch
        return reuse_weights(self.model, batches, foreign, max_tokens, r.min_ess_fraction, r.force)

    def delta_h1(
        self, E: Samples, U: Samples | None = None, update: UpdateRule | None = None, *, with_second_order=None
    ) -> DeltaH1Result:
        """δH₁ = X̄·Δθ ± SE for `update` (default: params `update`), X̄ from E, Δθ from U (none for an
        observed step), with δH₂ and η* unless with_second_order is False (default: second_order.enabled)."""
        update = update if update is not None else self.update_rule()
        if update.emulated and U is None:
            raise ProbeError(f"update rule {update.rule} needs a U batch", "pass U = probe.sample_u()")
        if update.state.sharded != sharded.is_sharded(self.model):
            raise ProbeError("the update was made for a policy sharded otherwise than this one (compute.shard)",
                             "build it with this Probe's update_rule() after setting compute.shard")  # fmt: skip
        if update.state.sharded and update.chain is not None:
            raise ProbeError(f"compute.shard fsdp takes one step per U batch, not {update.chain.steps}",
                             "set update.mini_batches: 1 and update.epochs: 1, or compute.shard: none")  # fmt: skip
        if update.emulated:
            require_policy_gradient(U, update.rule)
        samples = {"E": E} if not update.emulated else {"E": E, "U": U}
        batches = {k: self.batch(s) for k, s in samples.items()}
        reuse = self.reuse(batches, samples)
        estimate = compute_delta_h1(
            self.model, batches["E"], batches.get("U"), self.layout, update, self.params.estimator, self.budget, reuse
        )
        log.info("delta-h1: phase seconds %s", estimate.timings)
        enabled = self.params.second_order.enabled if with_second_order is None else with_second_order
        second = None
        if enabled:
            second = self.second_order(batches["E"], estimate.delta_theta, update.learning_rate, reuse.e_weights)
        return self._result(samples, batches, update, reuse, estimate, second)

    def second_order(self, E: Batch, delta_theta: torch.Tensor, lr: float, e_weights=None) -> SecondOrderRecord:
        """δH₂ ± SE along `delta_theta` (flat float64, lr included) and the linear regime's η* (docs/math.md §5.6)."""
        spec = SecondOrderSpec.of(self.params.second_order)
        max_tokens = self.params.compute.max_tokens_per_microbatch
        result = second_order(
            self.model,
            E,
            self.layout,
            delta_theta,
            self.params.estimator,
            spec,
            lr=lr,
            max_tokens=max_tokens,
            e_weights=e_weights,
        )
        return SecondOrderRecord(**result.numbers())

    def forecast(
        self,
        E: Samples,
        U: Samples,
        trainer_groups: int,
        *,
        update: UpdateRule | None = None,
        n_draws: int = 16,
        seed: int = 0,
        reference: torch.Tensor | None = None,
        exact_draws: int | None = None,
    ) -> ForecastResult:
        """The trainer's next ΔH: δH₁ + δH₂ along steps of the trainer's batch size (`trainer_groups` prompts),
        each a draw of U's groups taken through the real update rule, K = `n_draws` of them (docs/math.md §11.2).

        U is the pool (more groups than the trainer's batch); the pool's own δH₁ result (with δH₂ and the
        linear-regime verdict along its Δθ) comes along. `reference`: a flat Δθ (e.g. the
        observed step) the draws' cosines are measured against. `exact_draws` (default trajectory.exact_draws):
        below K, every draw's δH₂ comes from one shared finite difference around the mean step and only that many
        draws get their own (docs/math.md §11.4); None or K or more: each draw its own (2 E backward passes each)."""
        sharded.refuse("a forecast", self.params.compute.shard)
        update = update if update is not None else self.update_rule()
        if not update.emulated:
            raise ProbeError(
                "a forecast emulates the trainer's step, so it needs an emulated update rule", "use adam_step"
            )
        if update.chain is not None:
            raise ProbeError(
                f"a forecast scores one trainer step per checkpoint pair, but the update is {update.chain.steps} "
                "steps per U batch (update.mini_batches × update.epochs)",
                "set update.mini_batches: 1 and update.epochs: 1",
            )
        result = self.delta_h1(E, U, update, with_second_order=True)
        est = result.estimate
        if est.u_group_gradients is None:
            raise ProbeError(*NO_GROUP_GRADIENTS)
        n_pool = est.u_group_gradients.shape[0]
        check_pool(n_pool, trainer_groups, "the U batch's prompt count")
        batch = self.batch(E)
        e_weights = self.reuse({"E": batch}, {"E": E}).e_weights
        fd_eps, max_tokens = self.params.second_order.fd_eps, self.params.compute.max_tokens_per_microbatch

        def taylor(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first, second, _ = taylor_rows(
                self.model, batch, self.layout, delta, self.params.estimator, fd_eps, max_tokens, e_weights
            )
            return first, second

        def shifted(mean_delta: torch.Tensor, deltas: list[torch.Tensor]):
            steps = (0.0, fd_eps, -fd_eps)
            points = shifted_estimates(
                self.model, batch, self.layout, mean_delta, self.params.estimator, max_tokens, steps, e_weights,
                pass_at_zero=False, along=deltas,
            )  # fmt: skip
            return points[fd_eps].influence, points[-fd_eps].influence, fd_eps

        draws = resample_groups(n_pool, trainer_groups, n_draws, seed)
        groups, shares = est.u_group_gradients, est.u_group_denominators
        exact_draws = self.params.trajectory.exact_draws if exact_draws is None else exact_draws
        if exact_draws is None or exact_draws >= n_draws or n_draws * self.layout.numel * 8 > SHARED_DRAW_BYTES:
            sim = simulate_trainer_draws(update, groups, shares, draws, taylor, reference)
        else:
            sim = simulate_trainer_draws_shared(update, groups, shares, draws, shifted, taylor, exact_draws, reference)
        return ForecastResult(summarise_forecast(sim, n_pool, trainer_groups), sim, result)

    def whatif(self, E: Samples, U: Samples, result: DeltaH1Result, update: UpdateRule | None = None) -> WhatIfResult:
        """Token attributions of δH₁ over U, the what-if rows (params `whatif.rows`) and the entropy-neutral
        setting, all from `result`'s X̄ (delta-h1 on the same E, this checkpoint), docs/math.md §12."""
        sharded.refuse("what-if rows", self.params.compute.shard)
        update = update if update is not None else self.update_rule()
        if not update.emulated or update.chain is not None:
            raise ProbeError(
                f"what-if rows vary one emulated step, but the update is {update.describe()}",
                "use update.rule adam_step (or adam_precond, sgd) with update.mini_batches: 1 and update.epochs: 1",
            )
        require_policy_gradient(U, update.rule)
        result.report.check_checkpoint(
            self.fingerprint, "the probed checkpoint is", "rerun delta-h1 for this checkpoint (dvc repro)"
        )
        result.bars.check_fits(self.model)
        samples = {"E": E, "U": U}
        batches = {k: self.batch(s) for k, s in samples.items()}
        reuse = self.reuse(batches, samples)
        xbar = self.layout.flatten(result.bars.xbar, torch.float64).to(self.device)
        spec = self.params.whatif
        outcome = what_if(
            self.model,
            self.layout,
            batches["E"],
            batches["U"],
            update,
            spec.rows,
            self.params.estimator,
            xbar,
            spec,
            budget=self.budget,
            eps=self.params.advantage.eps,
            reuse=reuse,
        )
        log.info("whatif: phase seconds %s", outcome.timings)
        return build_whatif(outcome, U, self.tokenizer, spec, self.fingerprint, update.describe())

    def _result(self, samples, batches, update: UpdateRule, reuse, estimate: DeltaH1Estimate, second) -> DeltaH1Result:
        E, U = batches["E"], batches.get("U")
        U_s = samples.get("U")
        report = DeltaH1Report(
            **estimate.report_fields(),
            B_E=len(E),
            B_U=None if U is None else int(U_s.group_index.max()) + 1,
            G=None if U is None else U_s.meta.G,
            n_E_tokens=int(E.mask.sum()),
            n_U_tokens=None if U is None else int(U.mask.sum()),
            estimator=self.params.estimator.model_dump(),
            update=update.record(),
            checkpoint_fingerprint=self.fingerprint,
            reuse=ReuseRecord.of(
                {k: s.meta.checkpoint_fingerprint for k, s in samples.items()},
                {k: len(s.input_ids) for k, s in samples.items()},
                reuse.ess,
            ),
            world_size=distributed.world_size(),
            shard="fsdp" if sharded.is_sharded(self.model) else "none",
            second_order=second,
            realised_step=self._realised_step(update, estimate),
        )
        bars = self._bars(estimate, report.learning_rate)
        u_att, u_loo = estimate.u_attribution, estimate.u_attribution_loo
        csv = attributions_csv(
            None if u_att is None else u_att.tolist(),
            estimate.e_contributions.tolist(),
            U_s,
            samples["E"],
            self.tokenizer,
            None if u_loo is None else u_loo.tolist(),
        )
        return DeltaH1Result(report, bars, csv, estimate)

    def _refuse_if_sharded(self, what: str, fix: str) -> None:
        """One line for a computation on the whole policy asked of a policy this Probe has sharded."""
        if sharded.is_sharded(self.model):
            raise ProbeError(f"{what} needs the whole policy, and this Probe's is sharded (compute.shard fsdp)", fix)

    def _bars(self, estimate: DeltaH1Estimate, lr: float) -> Bars | None:
        """X̄ and Δθ per parameter (bars.safetensors); sharded: gathered whole onto rank 0 (None elsewhere)."""
        if sharded.is_sharded(self.model):  # Δθ gathered as the float32 bars.safetensors keeps
            xbar = sharded.gather_named(estimate.xbar, self.layout, self.model)
            delta = sharded.gather_named(estimate.delta_theta, self.layout, self.model, torch.float32)
        else:
            xbar, delta = self.layout.unflatten(estimate.xbar), self.layout.unflatten(estimate.delta_theta)
        if xbar is None:
            return None
        return Bars(xbar, {n: t.float() for n, t in delta.items()}, lr, self.params.estimator.entropy)

    def _realised_step(self, update: UpdateRule, estimate: DeltaH1Estimate) -> RealisedStepRecord | None:
        """δH₁ along round(θ + Δθ) − θ when the trainable weights are half precision and Δθ is emulated (an
        observed step is the difference of two stored checkpoints: realised already)."""
        params = dict(self.model.named_parameters())
        dtype = params[self.layout.names[0]].dtype
        if not update.emulated or dtype not in (torch.bfloat16, torch.float16):
            return None
        theta = self.layout.flatten({n: local_tensor(params[n].detach()) for n in self.layout.names})
        delta = estimate.delta_theta.double().cpu()
        realised = realised_step(theta.cpu(), delta)
        moving = delta != 0
        total = update.state.total  # over every process's shard when sharded
        n_moving = float(total(moving))
        return RealisedStepRecord(
            dtype=str(dtype).removeprefix("torch."),
            delta_h1=float(total(estimate.xbar.double().cpu() * realised)),
            fraction_lost=float(update.state.norm(realised - delta) / update.state.norm(delta)) if n_moving else 0.0,
            fraction_unmoved=float(total((realised == 0) & moving)) / n_moving if n_moving else 0.0,
        )

    # ---------------------------------------------------------------------------------- checks

    def exact(self, E: Samples, result: DeltaH1Result) -> ExactReport:
        """Exact H, ∇H·Δθ, the FD slope and ΔH(η) by enumeration over E's prompts and the whole prompt
        population, beside `result`'s estimate (tiny models only: exact.max_sequences). Runs on a float64
        copy of the policy."""
        from .exact import exact_report

        self._refuse_if_sharded("exact enumeration", "run the exact stage (it loads the policy whole)")
        result.report.check_checkpoint(
            self.fingerprint, "the probed checkpoint is", "compute δH₁ with this probe (or rerun delta-h1)"
        )
        model64 = copy.deepcopy(self.model)
        return exact_report(model64, self.tokenizer, E, self.prompt_set, result.bars, result.report, self.params.exact)

    def truth(self, E: Samples, result: DeltaH1Result) -> TruthReport:
        """Ground-truth ΔH(η) for η on truth.eta_multipliers × lr: θ' = θ + (η/lr)·Δθ applied in place and
        restored bit-exactly; by SNIS over E and, with truth.fresh_samples, fresh samples (docs/math.md §8)."""
        from .ground_truth import check_multipliers, fresh_sampling, truth_report

        self._refuse_if_sharded("the ground truth", "run the truth stage (it loads the policy whole)")
        result.report.check_checkpoint(
            self.fingerprint,
            f"checkpoint.path {self.params.checkpoint.path} is",
            "rerun delta-h1 for this checkpoint (dvc repro), or point paths.delta_h1 at its output",
        )
        tp = self.params.truth
        multipliers = check_multipliers(tp.eta_multipliers)
        fresh = None
        if tp.fresh_samples:
            fresh = fresh_sampling(E, self.prompt_set, self.tokenizer, self.params.generation.gen_batch_size, tp.seed)
        batch = Batch.from_samples(E, self.device, self.params.compute.logits_chunk_mb)
        return truth_report(
            self.model,
            batch,
            E,
            result.report,
            result.bars,
            self.fingerprint,
            fresh,
            multipliers,
            self.params.compute.max_tokens_per_microbatch,
            self.params.reuse.min_ess_fraction,
        )


def require_policy_gradient(U: Samples, rule: str) -> None:
    """A U batch whose every group has all-equal rewards has no policy gradient. AdamW still steps (momentum and
    weight decay), and so the forecast is that step (a warning); for the other rules Δθ = 0: refused."""
    if bool(U.advantages.any()):
        return
    if rule == "adam_step":
        log.warning(
            "every U group has all-equal rewards (all advantages are 0): the step is AdamW's momentum and weight "
            "decay alone, as the trainer would take it on such a batch (SE_U is not estimable)"
        )
        return
    raise ProbeError(
        f"every U group has all-equal rewards (all advantages are 0), so the update has no policy gradient and "
        f"update.rule {rule} has Δθ = 0",
        "sample more or harder U prompts (batch_config.B_U, batch_config.G), check the reward function, or use "
        "update.rule adam_step (its momentum step)",
    )


def _observed_step(checkpoint, paths, next_checkpoint, layout: FlatLayout, model) -> ObservedStep:
    """Δθ_obs = θ(next) − θ(this) from the trained weights' files, with its record; `next_checkpoint` None: the run's
    next checkpoint-N. Refuses the checkpoint itself and a next checkpoint that is not this run's next step."""
    from .observed import check_next_checkpoint, checkpoint_step
    from .observed import next_checkpoint as next_in_run
    from .sources import source_for

    next_dir = Path(next_checkpoint) if next_checkpoint is not None else next_in_run(Path(checkpoint.path))
    try:
        source = source_for(checkpoint)
        nxt = source.resolve(checkpoint.model_copy(update={"path": str(next_dir), "optimizer_path": None}))
    except ProbeError as exc:
        raise ProbeError(f"next checkpoint {next_dir} (update.next_checkpoint): {exc}") from None
    if nxt.checkpoint_dir.resolve() == paths.checkpoint_dir.resolve():
        raise ProbeError(
            f"update.next_checkpoint {nxt.checkpoint_dir} is checkpoint.path itself", "name the checkpoint after it"
        )
    check_next_checkpoint(paths, nxt)  # a later checkpoint of the same run (a gap of several steps: a warning)
    delta = source.observed_step(paths, nxt, layout, model)
    step, next_step = checkpoint_step(paths), checkpoint_step(nxt)
    record = ObservedRecord(
        next_checkpoint=str(nxt.checkpoint_dir),
        next_checkpoint_fingerprint=source.fingerprint(nxt),
        step=step,
        next_step=next_step,
        norm_delta_theta_obs=float(delta.norm()),
    )
    return ObservedStep(delta, record)


__all__ = ["DeltaH1Result", "ForecastResult", "IN_MEMORY", "Probe", "require_policy_gradient"]
