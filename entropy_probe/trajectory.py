"""The probe scored against the steps a trainer really took (docs/math.md §11).

A run dir whose Trainer saved `checkpoint-N/` every step holds every step it took. For each consecutive
pair (k, k+1), with Δθ_obs = θ(k+1) − θ(k) (`observed.observed_delta_theta`) and the configured entropy
target H:

- ΔH_obs = H(θ(k+1)) − H(θ(k)), exact by enumeration over the whole prompt population (float64 model);
- δH₁_obs, δH₂_obs exact along the real step: central differences of the exact H(θ(k) + sΔθ_obs) at
  s = ±h,  δH₁ = (H(h) − H(−h)) / 2h,  δH₂ = ½ d²H/ds² = (H(h) + H(−h) − 2H(0)) / 2h²;
  and their estimates from an E batch drawn at θ(k) (`Probe.delta_h1` along `Probe.observed_step`),
  z-tested against the exact values;
- δH₁_pred ± SE from the probe's own U draw (`Probe.update_rule`: params `update`, as delta-h1),
  and a second independent U draw: ‖Δθ_emul‖/‖Δθ_obs‖ and cos(Δθ_emul, Δθ_obs), beside the cosine of
  the two draws' Δθ_emul (the yardstick);
- the trainer's logged `entropy` (TRL's log_history) for its batch drawn at θ(k): its batch mean, shown
  beside H(θ(k)), never used as the truth.
Across k, `calibration.calibrate` summarises how well δH₁_pred predicted ΔH_obs.

At sizes where the population cannot be enumerated (exact.max_sequences) the stage refuses: estimating
ΔH_obs from samples (common random numbers / SNIS with an SE) is not implemented.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import task
from .artifacts.trajectory import CalibrationMetrics, Trajectory, TrajectoryStep
from .calibration import calibrate, prediction_se, z_scores
from .delta_h1 import Clock
from .enumeration import entropy_at, sequences_per_prompt
from .errors import ProbeError
from .exact import float64_policy, population_token_ids
from .generation import derive_seed, special_ids
from .observed import checkpoint_number
from .params import Params
from .probe import Probe
from .specs import EnumerationSpec
from .tiny import one_thread

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


def population_of(params: Params, tokenizer, vocab_size: int, temperature: float) -> Population:
    """The prompt population (batch_config's dataset) tokenised as sampling does; refused when its
    enumeration would exceed exact.max_sequences."""
    gen = params.generation
    prompt_set = task.load_prompts(params.batch_config)
    n_seq = len(prompt_set) * sequences_per_prompt(vocab_size, 1, gen.max_new_tokens)
    if n_seq > params.exact.max_sequences:
        raise ProbeError(
            f"exact ΔH_obs needs {n_seq} sequences ({len(prompt_set)} prompts, vocabulary {vocab_size}, "
            f"max_new_tokens {gen.max_new_tokens}) > exact.max_sequences = {params.exact.max_sequences}: enumeration "
            "is not possible, and estimating ΔH_obs from samples is not implemented at this size",
            "score steps on a model small enough to enumerate, or raise exact.max_sequences if memory allows",
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


def _z(estimate: float, exact: float, se: float) -> float | None:
    return float(z_scores([estimate], [exact], [se])[0]) if se > 0 else None


def score_step(pair: StepPair, probe: Probe, population: Population, trainer_entropy, entropy) -> TrajectoryStep:
    """Every number of one TrajectoryStep. `probe`: the policy at θ(k) with its AdamW state; `entropy`:
    exact H(θ(k)) when the previous step computed it."""
    tp = probe.params.trajectory
    observed = probe.observed_step(pair.next)
    lr = probe.learning_rate  # of the step k → k+1 (checkpoint.learning_rate; `next`: the stored one)
    clock = Clock()
    model64 = float64_policy(copy.deepcopy(probe.model), set(probe.layout.names))
    delta_obs = observed.observed.delta_theta
    exact = clock("exact", exact_along_step, model64, population, probe.layout.unflatten(delta_obs), tp.fd_eps, entropy)
    E = clock("sample", probe.sample_e, tp.B_E, derive_seed(tp.seed, "trajectory E", pair.step))
    U1 = clock("sample", probe.sample_u, tp.B_U, derive_seed(tp.seed, "trajectory U", pair.step, 1))
    U2 = clock("sample", probe.sample_u, tp.B_U, derive_seed(tp.seed, "trajectory U", pair.step, 2))
    rule = probe.update_rule()
    first = clock("delta_h1", probe.delta_h1, E, U1, rule, with_second_order=False)
    second_draw = clock("delta_h1", probe.delta_h1, E, U2, rule, with_second_order=False)
    obs = clock("delta_h1", probe.delta_h1, E, None, observed, with_second_order=True).report
    log.debug("trajectory: step %d phase seconds %s", pair.step, dict(clock))
    curvature = obs.second_order
    pred, emul, emul2 = first.report, first.estimate.delta_theta, second_draw.estimate.delta_theta
    se_pred = None if pred.se_U is None else float(prediction_se([pred.se_E], [pred.se_U], tp.B_U, tp.trainer_B_U)[0])
    norm_obs = float(delta_obs.norm())
    return TrajectoryStep(
        step=pair.step,
        next_step=pair.step + 1,
        checkpoint=str(pair.this),
        next_checkpoint=str(pair.next),
        learning_rate=lr,
        entropy=exact.entropy,
        entropy_next=exact.entropy_next,
        entropy_sampled=pred.entropy,
        trainer_entropy=trainer_entropy,
        delta_h_obs=exact.delta_h_obs,
        delta_h_obs_method="exact",
        delta_h1_obs_exact=exact.delta_h1,
        delta_h2_obs_exact=exact.delta_h2,
        delta_h1_obs=obs.delta_h1,
        se_delta_h1_obs=obs.se_E,
        z_delta_h1_obs=_z(obs.delta_h1, exact.delta_h1, obs.se_E),
        delta_h2_obs=curvature.delta_h2,
        se_delta_h2_obs=curvature.se_delta_h2,
        z_delta_h2_obs=_z(curvature.delta_h2, exact.delta_h2, curvature.se_delta_h2),
        delta_h1_pred=pred.delta_h1,
        se_E=pred.se_E,
        se_U=pred.se_U,
        se_pred=se_pred,
        z=None if not se_pred else (exact.delta_h_obs - pred.delta_h1) / se_pred,
        delta_h1_pred_second_draw=second_draw.delta_h1,
        norm_delta_theta_obs=norm_obs,
        norm_ratio=float(emul.norm()) / norm_obs if norm_obs > 0 else 0.0,
        cos_emul_obs=cosine(emul, delta_obs),
        cos_emul_obs_second_draw=cosine(emul2, delta_obs),
        cos_emul_emul=cosine(emul, emul2),
    )


def calibration_of(steps: list[TrajectoryStep], b_u_probe: int, b_u_trainer: int) -> CalibrationMetrics:
    """The calibration summary over every step (the forecast z over the steps with an SE_U)."""
    summary = calibrate(
        delta_h_obs=[s.delta_h_obs for s in steps],
        delta_h1_pred=[s.delta_h1_pred for s in steps],
        se_E=[s.se_E for s in steps],
        se_U=[s.se_U for s in steps],
        b_u_probe=b_u_probe,
        b_u_trainer=b_u_trainer,
        delta_h1_obs_exact=[s.delta_h1_obs_exact for s in steps],
        delta_h2_obs_exact=[s.delta_h2_obs_exact for s in steps],
        z_delta_h1_obs=[s.z_delta_h1_obs for s in steps if s.z_delta_h1_obs is not None],
        z_delta_h2_obs=[s.z_delta_h2_obs for s in steps if s.z_delta_h2_obs is not None],
    )
    return CalibrationMetrics(**summary.as_dict())


# ----------------------------------------------------------------------------------------------
# the whole run


def score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    """Load every θ(k) of `pairs` (`Probe.from_checkpoint`: AdamW state and the trainer's settings, as every
    stage) and score its step."""
    with one_thread():  # many small float64 matmuls: one thread is as fast, and much faster on a busy CPU
        return _score_trajectory(params, pairs)


def _score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    if params.update.rule == "observed":
        raise ProbeError(
            "the trajectory predicts each step from a U draw, so update.rule cannot be observed",
            "set update.rule to adam_step (the trainer's AdamW step), adam_precond or sgd",
        )
    logged = trainer_entropy_log([p.next for p in pairs])
    steps, carried, population = [], {}, None  # carried: exact H(θ(k+1)) from step k = H(θ(k)) of step k+1
    for pair in pairs:
        start = time.perf_counter()
        probe = Probe.from_checkpoint(pair.this, params=params)
        if population is None:
            temperature = probe.sampler_info("samples_e").temperature
            population = population_of(params, probe.tokenizer, probe.model.config.vocab_size, temperature)
            _log_plan(params, pairs, population, temperature)
        step = score_step(pair, probe, population, logged.get(pair.step + 1), carried.get(pair.step))
        carried = {pair.step + 1: step.entropy_next}
        steps.append(step)
        _log_step(step, time.perf_counter() - start)
    tp = params.trajectory
    return Trajectory(
        run_dir=tp.run_dir,
        target=params.estimator.entropy,
        B_E=tp.B_E,
        B_U=tp.B_U,
        G=params.batch_config.G,
        trainer_B_U=tp.trainer_B_U,
        fd_eps=tp.fd_eps,
        n_population_prompts=len(population.prompts),
        n_population_sequences=population.n_sequences,
        steps=steps,
        calibration=calibration_of(steps, tp.B_U, tp.trainer_B_U),
    )


def _log_plan(params: Params, pairs: list[StepPair], population: Population, temperature: float) -> None:
    log.info(
        "trajectory: %d steps of %s; target %s, T=%g; exact H over %d prompts (%d sequences each evaluation)",
        len(pairs),
        params.trajectory.run_dir,
        params.estimator.entropy,
        temperature,
        len(population.prompts),
        population.n_sequences,
    )


def _log_step(step: TrajectoryStep, seconds: float) -> None:
    log.info(
        "trajectory: step %d→%d  ΔH_obs %+.3e  δH₁_pred %+.3e ± %.1e  z %s  δH₁_obs %+.3e (exact %+.3e)  "
        "cos(emul, obs) %.2f vs %.2f  (%.1fs)",
        step.step,
        step.next_step,
        step.delta_h_obs,
        step.delta_h1_pred,
        step.se_pred or float("nan"),
        "n/a" if step.z is None else f"{step.z:+.2f}",
        step.delta_h1_obs,
        step.delta_h1_obs_exact,
        step.cos_emul_obs,
        step.cos_emul_emul,
        seconds,
    )


__all__ = [
    "ExactStep",
    "Population",
    "StepPair",
    "cosine",
    "calibration_of",
    "exact_along_step",
    "population_of",
    "score_step",
    "score_trajectory",
    "step_pairs",
    "trainer_entropy_log",
]
