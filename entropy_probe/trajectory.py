"""The probe scored against the steps a trainer really took (docs/math.md §11).

A run dir whose Trainer saved `checkpoint-N/` every step holds every step it took. For each consecutive
pair (k, k+1), with Δθ_obs = θ(k+1) − θ(k) (`observed.observed_delta_theta`) and the configured entropy
target H:

- ΔH_obs = H(θ(k+1)) − H(θ(k)): exact by enumeration over the whole prompt population (float64 model), or, at
  sizes enumeration cannot reach, sampled with an SE (`observed_entropy.sampled_delta_h`: fresh responses at both
  checkpoints with common random numbers, SNIS of an E batch, their minimum-variance combination);
- δH₁_obs, δH₂_obs along the real step: exact by central differences of the exact H(θ(k) + sΔθ_obs) at s = ±h,
  δH₁ = (H(h) − H(−h)) / 2h,  δH₂ = (H(h) + H(−h) − 2H(0)) / 2h²; and their estimates from an E batch drawn at
  θ(k) (`Probe.delta_h1` along `Probe.observed_step`), z-tested against the exact values;
- the forecast (`Probe.forecast`): δH₁ + δH₂ along K simulated trainer steps, each trainer_B_U of the probe's
  B_U U groups through the real update rule (clipping and AdamW), its SE and the spread σ_T of the trainer's
  own draw; the δH₁-only forecast beside it; the pool's own δH₁ ± (SE_E, SE_U), δH₂ and linear-regime verdict;
- the emulation check: ‖Δθ_S‖/‖Δθ_obs‖ and cos(Δθ_S, Δθ_obs) of the simulated steps, beside the cosine of two
  independent simulated steps (the yardstick);
- the trainer's logged `entropy` (TRL's log_history) for its batch drawn at θ(k): its batch mean, shown
  beside H(θ(k)), never used as the truth.
Across k, `calibration.calibrate` summarises how well the forecast predicted ΔH_obs.
The trainer's settings are read and checked first (`trainer_checks`): a probe setting that changes what ΔH_obs
measures (max_new_tokens, temperature, top_p) must match the trainer's.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import task
from .artifacts.trajectory import CalibrationMetrics, SampledObservation, Trajectory, TrajectoryStep
from .calibration import calibrate, forecast_z, z_scores
from .delta_h1 import Clock
from .enumeration import entropy_at, sequences_per_prompt
from .errors import ProbeError
from .exact import float64_policy, population_token_ids
from .forecast import check_pool
from .generation import derive_seed, special_ids
from .observed import checkpoint_number
from .params import Params
from .probe import Probe
from .specs import EnumerationSpec
from .tiny import one_thread
from .update_rule import UpdateRule

if TYPE_CHECKING:
    from .observed_entropy import SampledDeltaH

log = logging.getLogger(__name__)

SAVE_EVERY_STEP = "save a checkpoint every step (Trainer save_steps=1) and point trajectory.run_dir at that run"


# ----------------------------------------------------------------------------------------------
# the run dir


@dataclass(frozen=True)
class StepPair:
    """One observed step: checkpoint `step` → checkpoint `step + 1` of the same run."""

    step: int
    this: Path
    next: Path


def step_pairs(run_dir: str | Path, steps: list[int] | None = None) -> list[StepPair]:
    """The consecutive checkpoint pairs (k, k+1) of `run_dir` (numeric order), those with k in `steps` if given.

    Refuses a run dir with fewer than two checkpoints, and pairs more than one step apart (their difference
    is several steps, while the probe predicts one).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ProbeError(f"trajectory.run_dir {run} is not a directory", "point it at a Trainer output dir")
    found = sorted((n, d) for d in run.iterdir() if d.is_dir() and (n := checkpoint_number(d)) is not None)
    if len(found) < 2:
        raise ProbeError(
            f"run dir {run} holds {len(found)} checkpoint-N dir(s); scoring steps needs at least two consecutive ones",
            SAVE_EVERY_STEP,
        )
    pairs = [StepPair(a, da, db) for (a, da), (b, db) in zip(found, found[1:]) if b == a + 1]
    if steps is not None:
        known = {p.step for p in pairs}
        missing = [k for k in steps if k not in known]
        if missing:
            raise ProbeError(
                f"trajectory.steps names step {missing[0]}, but {run} has no checkpoint-{missing[0]} followed by "
                f"checkpoint-{missing[0] + 1}",
                f"choose steps among {sorted(known)} or set trajectory.steps: null",
            )
        pairs = [p for p in pairs if p.step in set(steps)]
    if not pairs:
        names = ", ".join(d.name for _, d in found[:4])
        raise ProbeError(f"run dir {run} has no two checkpoints one step apart ({names}, ...)", SAVE_EVERY_STEP)
    return pairs


def trainer_entropy_log(run_checkpoints: list[Path]) -> dict[int, float]:
    """{step s: entropy} from the latest trainer_state.json's log_history (TRL logs `entropy` per step).

    The entry of step s is the mean over the completions of the batch that step trained on, drawn by the
    policy before it, θ(s − 1). Missing file or key: an empty mapping (the trainer did not log it).
    """
    for ckpt in sorted(run_checkpoints, key=lambda d: checkpoint_number(d) or 0, reverse=True):
        path = ckpt / "trainer_state.json"
        if path.is_file():
            try:
                history = json.loads(path.read_text()).get("log_history", [])
            except (OSError, json.JSONDecodeError, AttributeError):
                raise ProbeError(f"{path} is not a readable trainer state", "re-save the checkpoint") from None
            return {
                int(e["step"]): float(e["entropy"])
                for e in history
                if isinstance(e, dict) and "step" in e and isinstance(e.get("entropy"), (int, float))
            }
    return {}


# ----------------------------------------------------------------------------------------------
# exact entropy over the prompt population


@dataclass
class Population:
    """Exact H (one target) over every dataset prompt, each with weight 1/n, by enumeration (`entropy_at`)."""

    prompts: list[list[int]]
    target: str
    spec: EnumerationSpec
    n_sequences: int

    def entropy(self, model64, delta: dict[str, torch.Tensor] | None = None, scale: float = 0.0) -> float:
        """H(θ + scale·Δθ) on the float64 model (θ itself when delta is None)."""
        return entropy_at(model64, delta or {}, scale, self.prompts, None, **self.spec.kwargs())[self.target]


@dataclass(frozen=True)
class ExactStep:
    entropy: float  # H(θ(k))
    entropy_next: float  # H(θ(k) + Δθ_obs) = H(θ(k+1))
    delta_h1: float
    delta_h2: float

    @property
    def delta_h_obs(self) -> float:
        return self.entropy_next - self.entropy


def exact_along_step(
    model64, population: Population, delta: dict[str, torch.Tensor], h: float, entropy: float | None = None
) -> ExactStep:
    """Exact H at θ and θ + Δθ, and the first two Taylor terms along Δθ by central differences at s = ±h:

        δH₁ = (H(h) − H(−h)) / 2h,   δH₂ = (H(h) + H(−h) − 2 H(0)) / 2h²   (= ½ Δθᵀ∇²H Δθ)

    Truncation errors O(h²); float64 round-off about ε·H/h² in δH₂. `entropy` = H(θ) when already known.
    """
    h0 = population.entropy(model64) if entropy is None else entropy
    plus, minus = population.entropy(model64, delta, h), population.entropy(model64, delta, -h)
    return ExactStep(
        entropy=h0,
        entropy_next=population.entropy(model64, delta, 1.0),
        delta_h1=(plus - minus) / (2 * h),
        delta_h2=(plus + minus - 2 * h0) / (2 * h * h),
    )


def population_size(params: Params, tokenizer, vocab_size: int) -> tuple[task.PromptSet, int]:
    """The prompt population (batch_config's dataset) and the sequences one exact H evaluation enumerates."""
    prompt_set = task.load_prompts(params.batch_config)
    return prompt_set, len(prompt_set) * sequences_per_prompt(vocab_size, 1, params.generation.max_new_tokens)


def population_of(params: Params, tokenizer, vocab_size: int, temperature: float) -> Population:
    """The prompt population tokenised as sampling does; refused when its enumeration would exceed
    exact.max_sequences."""
    gen = params.generation
    prompt_set, n_seq = population_size(params, tokenizer, vocab_size)
    if n_seq > params.exact.max_sequences:
        raise ProbeError(
            f"exact ΔH_obs needs {n_seq} sequences ({len(prompt_set)} prompts, vocabulary {vocab_size}, "
            f"max_new_tokens {gen.max_new_tokens}) > exact.max_sequences = {params.exact.max_sequences}",
            "set trajectory.observed: sampled (or auto), or raise exact.max_sequences if memory allows",
        )
    ids = population_token_ids(prompt_set, tokenizer)
    chunk = max(params.exact.prompts_per_chunk, len(ids))  # no graph here: one chunk is cheapest
    eos = (special_ids(tokenizer)[0],)
    spec = EnumerationSpec(eos, gen.max_new_tokens, temperature, gen.top_p, params.exact.max_sequences, chunk)
    return Population(ids, params.estimator.entropy, spec, n_seq)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """a·b / (‖a‖ ‖b‖) in float64 (0 when either is 0)."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# one step


def _z(estimate: float, exact: float | None, se: float) -> float | None:
    return float(z_scores([estimate], [exact], [se])[0]) if se > 0 and exact is not None else None


@dataclass(frozen=True)
class Setup:
    """What every step shares: the trainer's batch, the probe's pool, how ΔH_obs is measured."""

    trainer_B_U: int
    trainer_B_U_source: str
    B_U: int
    observed: str  # exact | sampled
    population: Population | None  # exact only


def observe_exact(probe: Probe, setup: Setup, delta_obs, entropy) -> ExactStep:
    """ΔH_obs and δH₁, δH₂ along the step by enumeration on a float64 copy of the policy."""
    model64 = float64_policy(copy.deepcopy(probe.model), set(probe.layout.names))
    h = probe.params.trajectory.fd_eps
    return exact_along_step(model64, setup.population, probe.layout.unflatten(delta_obs), h, entropy)


def observe_sampled(probe: Probe, pair: StepPair, delta_obs) -> SampledDeltaH:
    """ΔH_obs from B_obs E rows drawn at θ(k) and fresh responses to their prompts at θ(k) and θ(k+1)."""
    from .ground_truth import fresh_sampling
    from .observed_entropy import sampled_delta_h

    tp, gen = probe.params.trajectory, probe.params.generation
    samples = probe.sample_e(tp.B_obs, derive_seed(tp.seed, "trajectory observed", pair.step))
    fresh = fresh_sampling(
        samples, probe.prompt_set, probe.tokenizer, gen.gen_batch_size, derive_seed(tp.seed, "fresh", pair.step)
    )
    return sampled_delta_h(
        probe.model,
        probe.batch(samples),
        probe.layout.unflatten(delta_obs),
        fresh,
        target=probe.params.estimator.entropy,
        max_tokens=probe.params.compute.max_tokens_per_microbatch,
        min_ess_fraction=probe.params.reuse.min_ess_fraction,
    )


@dataclass(frozen=True)
class Observation:
    """The step k → k+1 as it happened: the rule with Δθ_obs, and ΔH_obs exact (with the along-step terms) or sampled."""

    rule: UpdateRule
    exact: ExactStep | None
    sampled: SampledDeltaH | None

    @property
    def delta_h(self) -> tuple[float, float]:
        """(ΔH_obs, its SE)."""
        return (self.exact.delta_h_obs, 0.0) if self.exact is not None else (self.sampled.delta_h, self.sampled.se)


def observe(pair: StepPair, probe: Probe, setup: Setup, entropy: float | None = None) -> Observation:
    """Δθ_obs and ΔH_obs of the step (`entropy`: exact H(θ(k)) when the previous step computed it)."""
    rule = probe.observed_step(pair.next)
    delta_obs = rule.observed.delta_theta
    if setup.observed == "exact":
        return Observation(rule, observe_exact(probe, setup, delta_obs, entropy), None)
    return Observation(rule, None, observe_sampled(probe, pair, delta_obs))


def forecast_step(pair: StepPair, probe: Probe, setup: Setup, observation: Observation, clock: Clock | None = None):
    """The forecast of the step: E and U drawn at θ(k) (the params' trajectory.seed), then `Probe.forecast` along
    simulated steps of the trainer's batch, its emulation checked against Δθ_obs. Returns (E, the ForecastResult)."""
    tp = probe.params.trajectory
    clock = Clock() if clock is None else clock
    E = clock("sample", probe.sample_e, tp.B_E, derive_seed(tp.seed, "trajectory E", pair.step))
    U = clock("sample", probe.sample_u, setup.B_U, derive_seed(tp.seed, "trajectory U", pair.step, 1))
    fr = clock(
        "forecast",
        probe.forecast,
        E,
        U,
        setup.trainer_B_U,
        n_draws=tp.trainer_draws,
        seed=derive_seed(tp.seed, "trainer draws", pair.step),
        reference=observation.rule.observed.delta_theta,
    )
    return E, fr


def forecast_zs(forecast, observation: Observation) -> tuple[float | None, float | None]:
    """(z of the forecast δH₁ + δH₂, z of its first order alone) against ΔH_obs, with its SE when sampled."""
    delta_h_obs, se_obs = observation.delta_h
    return (
        forecast_z(delta_h_obs, forecast.delta_h, forecast.spread, se_obs),
        forecast_z(delta_h_obs, forecast.delta_h1, forecast.spread_first_order, se_obs),
    )


def score_step(pair: StepPair, probe: Probe, setup: Setup, trainer_entropy, observation: Observation) -> TrajectoryStep:
    """Every number of one TrajectoryStep. `probe`: the policy at θ(k) with its AdamW state (its params'
    trajectory.seed draws E, U and the trainer draws); `observation`: `observe`'s."""
    observed, exact, sampled = observation.rule, observation.exact, observation.sampled
    delta_obs = observed.observed.delta_theta
    delta_h_obs, se_obs = observation.delta_h
    clock = Clock()
    E, fr = forecast_step(pair, probe, setup, observation, clock)
    obs = clock("delta_h1", probe.delta_h1, E, None, observed, with_second_order=True).report
    log.debug("trajectory: step %d phase seconds %s", pair.step, dict(clock))
    f, pool, draws = fr.forecast, fr.pool.report, fr.draws
    curvature, pool_curvature = obs.second_order, pool.second_order
    z, z_first_order = forecast_zs(f, observation)
    norm_obs = float(delta_obs.norm())
    return TrajectoryStep(
        step=pair.step,
        next_step=pair.step + 1,
        checkpoint=str(pair.this),
        next_checkpoint=str(pair.next),
        learning_rate=probe.learning_rate,
        entropy=None if exact is None else exact.entropy,
        entropy_next=None if exact is None else exact.entropy_next,
        entropy_sampled=pool.entropy,
        trainer_entropy=trainer_entropy,
        delta_h_obs=delta_h_obs,
        delta_h_obs_method=setup.observed,
        se_delta_h_obs=se_obs,
        sampled=None if sampled is None else SampledObservation.of(sampled),
        delta_h1_obs_exact=None if exact is None else exact.delta_h1,
        delta_h2_obs_exact=None if exact is None else exact.delta_h2,
        delta_h1_obs=obs.delta_h1,
        se_delta_h1_obs=obs.se_E,
        z_delta_h1_obs=_z(obs.delta_h1, None if exact is None else exact.delta_h1, obs.se_E),
        delta_h2_obs=curvature.delta_h2,
        se_delta_h2_obs=curvature.se_delta_h2,
        z_delta_h2_obs=_z(curvature.delta_h2, None if exact is None else exact.delta_h2, curvature.se_delta_h2),
        forecast=f.delta_h,
        forecast_delta_h1=f.delta_h1,
        forecast_delta_h2=f.delta_h2,
        se_forecast=f.se,
        sd_trainer=f.sd_trainer,
        z=z,
        se_forecast_first_order=f.se_first_order,
        sd_trainer_first_order=f.sd_trainer_first_order,
        z_first_order=z_first_order,
        delta_h1_pred=pool.delta_h1,
        se_E=pool.se_E,
        se_U=pool.se_U,
        delta_h2_pred=pool_curvature.delta_h2,
        se_delta_h2_pred=pool_curvature.se_delta_h2,
        verdict=pool_curvature.verdict,
        eta_star=pool_curvature.eta_star,
        norm_delta_theta_obs=norm_obs,
        norm_ratio=float(draws.norm.mean()) / norm_obs if norm_obs > 0 else 0.0,
        cos_emul_obs=float(draws.cos_reference.mean()),
        cos_emul_emul=float(draws.cos_next.mean()),
    )


def calibration_of(steps: list[TrajectoryStep]) -> CalibrationMetrics:
    """The calibration summary over every step (exact along-step terms when every step has them)."""
    exact = all(s.delta_h1_obs_exact is not None for s in steps)
    return calibrate(
        delta_h_obs=[s.delta_h_obs for s in steps],
        forecast=[s.forecast for s in steps],
        forecast_first_order=[s.forecast_delta_h1 for s in steps],
        z=[s.z for s in steps],
        z_first_order=[s.z_first_order for s in steps],
        delta_h1_obs=[s.delta_h1_obs_exact if exact else s.delta_h1_obs for s in steps],
        delta_h2_obs=[s.delta_h2_obs_exact if exact else s.delta_h2_obs for s in steps],
        along_step="exact" if exact else "sampled",
        z_delta_h1_obs=[s.z_delta_h1_obs for s in steps],
        z_delta_h2_obs=[s.z_delta_h2_obs for s in steps],
        verdicts=[s.verdict for s in steps],
    )


# ----------------------------------------------------------------------------------------------
# the whole run


def score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    """Load every θ(k) of `pairs` (`Probe.from_checkpoint`: AdamW state and the trainer's settings, as every
    stage) and score its step."""
    with one_thread():  # many small float64 matmuls: one thread is as fast, and much faster on a busy CPU
        return _score_trajectory(params, pairs)


def setup_of(params: Params, probe: Probe) -> Setup:
    """The trainer's batch (trajectory.trainer_B_U, auto: its settings), the pool, ΔH_obs's method, after
    checking the probe's settings against the trainer's (`trainer_checks`)."""
    from .trainer_checks import check_against_trainer, trainer_prompts_per_step

    tp, config = params.trajectory, probe.trainer.config
    check_against_trainer(params, config, scoring_observed_steps=True)  # what ΔH_obs measures must be the trainer's
    if tp.trainer_B_U == "auto":
        trainer_b = trainer_prompts_per_step(config)
        if trainer_b is None:
            raise ProbeError(
                "the trainer's prompts per step are unknown (its settings lack per_device_train_batch_size, "
                "gradient_accumulation_steps or num_generations)",
                "set trajectory.trainer_B_U to the trainer's prompts (groups) per optimizer step",
            )
        source = "the trainer's per_device_train_batch_size × gradient_accumulation_steps ÷ num_generations"
    else:
        trainer_b, source = tp.trainer_B_U, "trajectory.trainer_B_U"
    pool = 4 * trainer_b if tp.B_U == "auto" else tp.B_U
    check_pool(pool, trainer_b, "trajectory.B_U")
    method, population = tp.observed, None
    temperature = probe.sampler_info("samples_e").temperature
    vocab = probe.model.config.vocab_size
    if method == "auto":
        _, n_seq = population_size(params, probe.tokenizer, vocab)
        method = "exact" if n_seq <= params.exact.max_sequences else "sampled"
    if method == "exact":
        population = population_of(params, probe.tokenizer, vocab, temperature)
    _log_plan(params, pool, trainer_b, source, method, population, temperature)
    return Setup(trainer_b, source, pool, method, population)


def _score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    if params.update.rule == "observed":
        raise ProbeError(
            "the trajectory predicts each step from a U draw, so update.rule cannot be observed",
            "set update.rule to adam_step (the trainer's AdamW step), adam_precond or sgd",
        )
    logged = trainer_entropy_log([p.next for p in pairs])
    steps, carried, setup = [], {}, None  # carried: exact H(θ(k+1)) from step k = H(θ(k)) of step k+1
    for pair in pairs:
        start = time.perf_counter()
        probe = Probe.from_checkpoint(pair.this, params=params)
        setup = setup or setup_of(params, probe)
        observation = observe(pair, probe, setup, carried.get(pair.step))
        step = score_step(pair, probe, setup, logged.get(pair.step + 1), observation)
        carried = {pair.step + 1: step.entropy_next}
        steps.append(step)
        _log_step(step, time.perf_counter() - start)
    tp = params.trajectory
    population = setup.population
    return Trajectory(
        run_dir=tp.run_dir,
        target=params.estimator.entropy,
        B_E=tp.B_E,
        B_U=setup.B_U,
        G=params.batch_config.G,
        trainer_B_U=setup.trainer_B_U,
        trainer_B_U_source=setup.trainer_B_U_source,
        trainer_draws=tp.trainer_draws,
        observed=setup.observed,
        B_obs=tp.B_obs if setup.observed == "sampled" else None,
        fd_eps=tp.fd_eps,
        n_population_prompts=len(probe.prompt_set),
        n_population_sequences=None if population is None else population.n_sequences,
        steps=steps,
        calibration=calibration_of(steps),
    )


def _log_plan(params: Params, pool: int, trainer_b: int, source: str, method: str, population, temperature) -> None:
    tp = params.trajectory
    measured = (
        f"exact over {len(population.prompts)} prompts ({population.n_sequences} sequences each evaluation)"
        if population is not None
        else f"sampled from {tp.B_obs} rows per step"
    )
    log.info(
        "trajectory: %s; target %s, T=%g; forecast from a pool of %d U prompts, %d simulated trainer steps of %d "
        "prompts (%s); ΔH_obs %s",
        tp.run_dir,
        params.estimator.entropy,
        temperature,
        pool,
        tp.trainer_draws,
        trainer_b,
        source,
        measured,
    )


def _log_step(step: TrajectoryStep, seconds: float) -> None:
    log.info(
        "trajectory: step %d→%d  ΔH_obs %+.3e%s  forecast %+.3e ± %.1e (trainer σ %.1e)  z %s (first order %s)  "
        "verdict %s  cos(emul, obs) %.2f vs %.2f  (%.1fs)",
        step.step,
        step.next_step,
        step.delta_h_obs,
        f" ± {step.se_delta_h_obs:.1e}" if step.se_delta_h_obs else "",
        step.forecast,
        step.se_forecast,
        step.sd_trainer,
        "n/a" if step.z is None else f"{step.z:+.2f}",
        "n/a" if step.z_first_order is None else f"{step.z_first_order:+.2f}",
        step.verdict,
        step.cos_emul_obs,
        step.cos_emul_emul,
        seconds,
    )


__all__ = [
    "ExactStep",
    "Population",
    "Observation",
    "Setup",
    "observe",
    "population_size",
    "setup_of",
    "StepPair",
    "cosine",
    "calibration_of",
    "forecast_step",
    "forecast_zs",
    "exact_along_step",
    "population_of",
    "score_step",
    "score_trajectory",
    "step_pairs",
    "trainer_entropy_log",
]
