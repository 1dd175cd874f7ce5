"""`EntropyProbeCallback`: the probe inside a running TRL/transformers Trainer, every `every` optimizer steps.

    trainer = GRPOTrainer(...)
    trainer.add_callback(EntropyProbeCallback(trainer, every=10, params=load_params("params.yaml")))
    trainer.train()      # logs entropy_probe/delta_h1, .../se, .../delta_h2, .../eta_star to report_to

At the end of step k (the optimizer has stepped, the scheduler holds the next lr) it wraps the live model, its
live AdamW state (`optimizer_state.optimizer_state_of`, copied to CPU) and the trainer's arguments in a `Probe`,
draws E and U from the current policy (prompts from `params.batch_config`, rewards from the trainer's own reward
functions (`TrainerRewards`; `rewards="params"`: batch_config.reward_fn), sampling settings from
`params.generation`, `auto` resolving to the trainer's), and computes δH₁ ± SE for the next step with δH₂ and η*
(`Probe.delta_h1`) — the same numbers the offline pipeline computes on checkpoint-k with the same samples.

It never changes training: every RNG stream the trainer draws from (torch CPU and CUDA, Python, NumPy) is
restored, the model's train/eval mode is restored, the probe's passes use `torch.autograd.grad` (never `.grad`)
and the optimizer is only read. The metrics go through `transformers.Trainer.log` (the base implementation:
TRL's override would flush its own per-step metric buffers early), so they reach every `report_to` backend.
With `save_dir`, each probe step writes its samples and the delta-h1 stage's files under `save_dir/step-k/`.
With `observe` (default) each probe step after the first also logs the entropy change since the previous one,
sampled with an SE (`observed_delta_h`, `observed_se`, `observed_since`) from a CPU copy of the trainable
parameters (cheap for LoRA). With `forecast_draws` it also logs the trajectory's forecast (`forecast`,
`forecast_se`, `forecast_sd_trainer`, `forecast_spread`) and, with every = 1, its running calibration (`z`,
`z_mean`, `z_sd`). `seconds`: the probe step's wall time (its overhead beside the trainer's step time).

A KL penalty (the trainer's beta) takes its reference as the trainer does: a LoRA policy with its adapter off, a
full-parameter policy the trainer's `ref_model`. Under torchrun / accelerate launch with plain DDP every process
runs the callback at the same steps on its replica of the model and the AdamW state: generation and the passes
split rows across the processes and all-reduce, as the offline stages do under torchrun, so every rank logs the
same numbers and rank 0 writes `save_dir`. DeepSpeed ZeRO and FSDP partition the optimizer state: refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed, sharded
from ..errors import ProbeError
from ..generation import derive_seed
from ..outputs import staged_output_dir
from ..params import Params
from ..trainer_checks import trainer_prompts_per_step
from ..trainer_config import TrainerConfig, TrainerSettings, trainer_config_from_args

log = logging.getLogger(__name__)

PREFIX = "entropy_probe/"


@contextlib.contextmanager
def untouched(model: torch.nn.Module):
    """Restore every RNG state the trainer uses and the model's training mode on exit."""
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    training = model.training
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        model.train(training)


class TrainerRewards:
    """A TRL GRPOTrainer's own reward: its `reward_funcs`, weighted by `reward_weights` and summed as the trainer
    sums them (a None reward is NaN and left out of the sum), called as the trainer calls them —
    fn(prompts=, completions=, completion_ids=, <answer column>=, trainer_state=, log_extra=, log_metric=) — on
    the probe's prompts and responses (plain text; the probe's prompt set gives the answer column). The probe's
    calls log nothing: its log_extra and log_metric do nothing. Reward models (nn.Module) are refused."""

    def __init__(self, trainer, answer_field: str) -> None:
        funcs = list(getattr(trainer, "reward_funcs", None) or [])
        if not funcs:
            raise ProbeError("this trainer has no reward_funcs", "pass rewards='params' (batch_config.reward_fn)")
        if any(isinstance(f, torch.nn.Module) for f in funcs):
            raise ProbeError(
                "the trainer scores with a reward model, which the probe does not run",
                "pass rewards='params' with a batch_config.reward_fn",
            )
        self.funcs, self.trainer, self.answer_field = funcs, trainer, answer_field
        weights = getattr(trainer, "reward_weights", None)
        self.weights = torch.ones(len(funcs)) if weights is None else torch.as_tensor(weights).float().cpu()
        names = getattr(trainer, "reward_func_names", None) or [getattr(f, "__name__", "reward") for f in funcs]
        self.name = "trainer: " + " + ".join(names)

    def __call__(self, prompts: list, responses: list, answers: list, completion_ids: list) -> list[float]:
        kwargs = {
            self.answer_field: answers,
            "trainer_state": self.trainer.state,
            "log_extra": lambda *a, **k: None,
            "log_metric": lambda *a, **k: None,
        }
        per_func = []
        for fn in self.funcs:
            values = fn(prompts=prompts, completions=responses, completion_ids=completion_ids, **kwargs)
            per_func.append([math.nan if v is None else float(v) for v in values])
        return (torch.tensor(per_func).T * self.weights).nansum(dim=1).tolist()


def check_replicated(trainer) -> None:
    """Several processes are fine when each holds the whole model and the same AdamW state (DDP: the trainer
    all-reduces gradients, so every rank's optimizer steps alike); DeepSpeed ZeRO and FSDP partition the state,
    which the live probe does not gather. Every rank must run the callback at the same steps (its passes split
    rows across the ranks and all-reduce, as the offline stages do under torchrun)."""
    world = getattr(trainer.args, "world_size", 1)
    sharded = [n for n in ("deepspeed", "fsdp") if getattr(trainer, f"is_{n}_enabled", False)]
    if world > 1 and sharded:
        raise ProbeError(
            f"EntropyProbeCallback reads the live AdamW state, which {sharded[0]} partitions across the {world} "
            "processes",
            "train with plain DDP (no deepspeed/fsdp), or probe the saved checkpoints offline (dvc repro)",
        )
    if world > 1 and not distributed.is_distributed():
        raise ProbeError(
            f"the trainer has {world} processes but no torch.distributed process group is up",
            "launch the training script with torchrun or accelerate launch",
        )


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class EntropyProbeCallback(_trainer_callback_base()):
    """Predict the next step's entropy change every `every` optimizer steps of `trainer` and log it.

    params: the probe's knobs (`Params`; default: all defaults) — batch_config names the prompts (and the reward
    with rewards='params'), B_E/B_U the batch sizes; rewards: 'trainer' scores U with the trainer's own reward
    functions (`TrainerRewards`), 'params' with batch_config.reward_fn, 'auto' (default) the trainer's when it has
    reward_funcs (a GRPOTrainer); seed: the probe's own sampling seed (each probe step derives its seeds from it and
    the global step, so a run's forecasts are reproducible and independent of the trainer's RNG).
    forecast_draws = K ≥ 2: also the trajectory's forecast (`Probe.forecast`: δH₁ + δH₂ along K simulated steps
    of the trainer's batch, from a U pool of 4× its prompts per step; docs/math.md §11.2); with every = 1 and
    `observe`, each next probe step scores it: z = (observed − forecast) / √(spread² + SE_obs²), and the
    running z mean and SD over the run say whether to trust the forecast on this run.
    """

    def __init__(
        self,
        trainer,
        every: int,
        params: Params | None = None,
        save_dir=None,
        seed: int = 0,
        observe: bool = True,
        forecast_draws: int = 0,
        rewards: str = "auto",
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        check_replicated(trainer)
        if forecast_draws == 1 or forecast_draws < 0:
            raise ValueError(f"forecast_draws must be 0 (off) or ≥ 2, got {forecast_draws}")
        self.trainer, self.every, self.seed, self.observe = trainer, every, seed, observe
        self.forecast_draws = forecast_draws
        if rewards not in ("auto", "trainer", "params"):
            raise ValueError(f"rewards must be 'auto', 'trainer' or 'params', got {rewards!r}")
        self.params = params if params is not None else Params()
        sharded.refuse("inside a training run (it would reshard the trainer's own model)", self.params.compute.shard)
        own = rewards == "trainer" or (rewards == "auto" and getattr(trainer, "reward_funcs", None))
        self.reward = TrainerRewards(trainer, self.params.batch_config.answer_field) if own else None
        log.info("entropy probe: U rewards from %s", self.reward.name if own else self.params.batch_config.reward_fn)
        reference = getattr(trainer, "ref_model", None)  # TRL's, for a full-parameter run with beta ≠ 0
        accelerator = getattr(trainer, "accelerator", None)
        if reference is not None and accelerator is not None:
            reference = accelerator.unwrap_model(reference)
        self.kl_reference = reference
        self._forecast: tuple[int, float, float] | None = None  # (step, F̄, spread) of the last forecast
        self._z: list[float] = []
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.history: list[dict] = []  # every logged record, with its step
        self._previous: tuple[int, dict[str, torch.Tensor]] | None = None  # (step, θ) of the last probe step

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        last = state.max_steps > 0 and state.global_step >= state.max_steps  # no next step to forecast
        if state.global_step % self.every or last:
            return control
        model = model if model is not None else self.trainer.model
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        with untouched(model):
            metrics = self.probe_step(model, optimizer, args, state.global_step)
        from transformers import Trainer

        flags = dict(vars(control))  # Trainer.log's on_log resets should_log: the trainer's own log must still run
        Trainer.log(self.trainer, metrics)  # the base log: reaches report_to, leaves TRL's buffers alone
        vars(control).update(flags)
        vars(self.trainer.control).update(flags)
        self.history.append({"step": state.global_step, **metrics})
        return control

    def probe_step(self, model, optimizer, args, step: int) -> dict[str, float]:
        """δH₁ ± SE (and δH₂, η*) of the next step at the live θ, as {PREFIX + key: value}."""
        from ..optimizer_state import optimizer_state_of
        from ..probe import Probe

        config = TrainerConfig.model_validate(trainer_config_from_args(args))
        trainer = TrainerSettings(config, "the live trainer's arguments", step)
        tokenizer = getattr(self.trainer, "processing_class", None) or self.trainer.tokenizer
        state = optimizer_state_of(model, optimizer)
        probe = Probe(model, tokenizer, state, trainer, self.params, reward=self.reward, kl_reference=self.kl_reference)
        start = time.perf_counter()
        E = probe.sample_e(seed=derive_seed(self.seed, "callback E", step))
        metrics: dict[str, float] = {}
        if self.forecast_draws:
            trainer_groups = trainer_prompts_per_step(config)
            if trainer_groups is None:
                raise ProbeError(
                    "the forecast needs the trainer's prompts per step, which its arguments do not give",
                    "set per_device_train_batch_size, gradient_accumulation_steps and num_generations",
                )
            U = probe.sample_u(4 * trainer_groups, derive_seed(self.seed, "callback U", step))
            seed = derive_seed(self.seed, "callback draws", step)
            fr = probe.forecast(E, U, trainer_groups, n_draws=self.forecast_draws, seed=seed)
            result, f = fr.pool, fr.forecast
            metrics.update(forecast=f.delta_h, forecast_se=f.se, forecast_sd_trainer=f.sd_trainer)
            metrics["forecast_spread"] = f.spread
        else:
            U = probe.sample_u(seed=derive_seed(self.seed, "callback U", step))
            result = probe.delta_h1(E, U)
        report = result.report
        if self.save_dir is not None:  # rank 0 writes; an error there is raised on every rank (on_rank0)
            distributed.on_rank0(lambda: self.save(step, E, U, result))
        metrics.update(delta_h1=report.delta_h1, se=report.se_delta_h1, se_E=report.se_E, entropy=report.entropy)
        if report.se_U is not None:
            metrics["se_U"] = report.se_U
        second = report.second_order
        if second is not None:
            metrics["delta_h2"] = second.delta_h2
            if second.eta_star is not None:
                metrics["eta_star"] = second.eta_star
        if self.observe:
            metrics.update(self.observed_change(probe, E, step))
            metrics.update(self.score_last_forecast(metrics, step))
        if self.forecast_draws:
            self._forecast = (step, metrics["forecast"], metrics["forecast_spread"])
        metrics["seconds"] = time.perf_counter() - start
        if distributed.is_rank0():
            log.info("entropy probe at step %d: δH₁ %+.3e ± %.1e", step, report.delta_h1, report.se_delta_h1)
        return {PREFIX + k: float(v) for k, v in metrics.items()}

    def save(self, step: int, E, U, result) -> None:
        """save_dir/step-k/: the samples and delta-h1's files, all or nothing, never over a dir the probe did not
        write (`outputs.staged_output_dir`)."""
        with staged_output_dir(self.save_dir / f"step-{step}") as out:
            E.write(out / "sample_e")
            U.write(out / "sample_u")
            result.save(out / "delta_h1")

    def score_last_forecast(self, metrics: dict, step: int) -> dict[str, float]:
        """z of the previous step's forecast against the change observed since, when that was one step ago
        (every = 1), and the running z mean and SD over the run (`calibration.z_summary`)."""
        from ..calibration import forecast_z, z_summary

        if self._forecast is None or "observed_delta_h" not in metrics or self._forecast[0] != step - 1:
            return {}
        _, forecast, spread = self._forecast
        z = forecast_z(metrics["observed_delta_h"], forecast, spread, metrics["observed_se"])
        if z is None:
            return {}
        self._z.append(z)
        summary = z_summary(self._z)
        out = {"z": z, "z_mean": summary.mean}
        if summary.sd is not None:
            out["z_sd"] = summary.sd
        return out

    def observed_change(self, probe, E, step: int) -> dict[str, float]:
        """H(θ(step)) − H(θ(previous probe step)), sampled with an SE (`observed_entropy.sampled_delta_h`: fresh
        responses to E's prompts at both points with common random numbers, and SNIS of E). The model stays at
        θ(step); the change is −[H(θ + (θ_prev − θ)) − H(θ)], θ_prev a CPU copy of the trainable parameters."""
        from ..ground_truth import fresh_sampling
        from ..observed_entropy import sampled_delta_h

        named = dict(probe.model.named_parameters())
        current = {n: named[n].detach().cpu().clone() for n in probe.layout.names}
        previous, self._previous = self._previous, (step, current)
        if previous is None:
            return {}
        since, theta = previous
        back = {n: (theta[n] - current[n]).to(named[n].device) for n in probe.layout.names}
        gen = self.params.generation
        fresh = fresh_sampling(
            E, probe.prompt_set, probe.tokenizer, gen.gen_batch_size, derive_seed(self.seed, "fresh", step)
        )
        out = sampled_delta_h(
            probe.model,
            probe.batch(E),
            back,
            fresh,
            target=self.params.estimator.entropy,
            max_tokens=self.params.compute.max_tokens_per_microbatch,
            min_ess_fraction=self.params.reuse.min_ess_fraction,
        )
        return {"observed_delta_h": -out.delta_h, "observed_se": out.se, "observed_since": since}


__all__ = ["EntropyProbeCallback", "PREFIX", "untouched"]
