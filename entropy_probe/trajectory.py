"""The probe scored against the steps a trainer really took (docs/math.md §11).

A run dir whose Trainer saved `checkpoint-N/` every step holds every step it took. For each consecutive
pair (k, k+1), with Δθ_obs = θ(k+1) − θ(k) (`observed.observed_delta_theta`) and the configured entropy
target H:

- ΔH_obs = H(θ(k+1)) − H(θ(k)), exact by enumeration over the whole prompt population (float64 model);
- δH₁_obs, δH₂_obs exact along the real step: central differences of the exact H(θ(k) + sΔθ_obs) at
  s = ±h,  δH₁ = (H(h) − H(−h)) / 2h,  δH₂ = ½ d²H/ds² = (H(h) + H(−h) − 2H(0)) / 2h²;
  and their estimates from an E batch drawn at θ(k) (`probe.compute_delta_h1` with the step given,
  `second_order.second_order`), z-tested against the exact values;
- δH₁_pred ± SE from the probe's own U draw (adam_step with the checkpoint's AdamW state, as delta-h1),
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
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import task
from .artifacts.samples import decode_responses
from .artifacts.trajectory import CalibrationMetrics, Trajectory, TrajectoryStep
from .calibration import calibrate, z_scores
from .enumeration import entropy_at, sequences_per_prompt
from .errors import ProbeError
from .generation import GenerationSpec, derive_seed, generate_responses, plan_e, plan_u, resolve_scale, special_ids
from .observed import adapter_parameter_names, checkpoint_number, observed_delta_theta
from .optimizer_state import learning_rate_next
from .params import Params
from .perturb import as_float64
from .probe import UpdateSpec, compute_delta_h1
from .scoring import Batch
from .second_order import second_order
from .tiny import one_thread
from .update import FlatLayout, group_advantages, resolve_loss_agg_mode

log = logging.getLogger(__name__)

HF_DEFAULT_MAX_GRAD_NORM = 1.0  # transformers.TrainingArguments.max_grad_norm
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
    enumerate_kwargs: dict  # eos_id, max_new_tokens, temperature, top_p, max_sequences, prompts_per_chunk
    n_sequences: int

    def entropy(self, model64, delta: dict[str, torch.Tensor] | None = None, scale: float = 0.0) -> float:
        """H(θ + scale·Δθ) on the float64 model (θ itself when delta is None)."""
        return entropy_at(model64, delta or {}, scale, self.prompts, None, **self.enumerate_kwargs)[self.target]


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


def population_of(params: Params, tokenizer, temperature: float) -> Population:
    """The prompt population (batch_config's dataset) tokenised as sampling does; refused when its
    enumeration would exceed exact.max_sequences."""
    prompt_set = task.load_prompts(params.batch_config)
    vocab = len(tokenizer)
    gen = params.generation
    n_seq = len(prompt_set) * sequences_per_prompt(vocab, 1, gen.max_new_tokens)
    if n_seq > params.exact.max_sequences:
        raise ProbeError(
            f"exact ΔH_obs needs {n_seq} sequences ({len(prompt_set)} prompts, vocabulary {vocab}, "
            f"max_new_tokens {gen.max_new_tokens}) > exact.max_sequences = {params.exact.max_sequences}: enumeration "
            "is not possible, and estimating ΔH_obs from samples is not implemented at this size",
            "score steps on a model small enough to enumerate, or raise exact.max_sequences if memory allows",
        )
    ids = [list(x) for x in tokenizer(prompt_set.prompts, add_special_tokens=False)["input_ids"]]
    kwargs = dict(
        eos_id=[special_ids(tokenizer)[0]],
        max_new_tokens=gen.max_new_tokens,
        temperature=temperature,
        top_p=gen.top_p,
        max_sequences=params.exact.max_sequences,
        prompts_per_chunk=max(params.exact.prompts_per_chunk, len(ids)),  # no graph here: one chunk is cheapest
    )
    return Population(ids, params.estimator.entropy, kwargs, n_seq)


# ----------------------------------------------------------------------------------------------
# drawing E and U at a checkpoint


@dataclass
class Sampler:
    """Draws E (prompts with replacement, one response) and U (distinct prompts, G responses, rewards and
    group advantages) from π_θ with the library the sample stages use."""

    tokenizer: object
    prompt_set: task.PromptSet
    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    G: int
    reward_fn: object
    scale: bool
    eps: float

    def _draw(self, model, rows: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        spec = GenerationSpec(self.temperature, self.top_p, self.max_new_tokens, self.batch_size, seed)
        prompts = [self.prompt_set.prompts[i] for i in rows.tolist()]
        tensors = generate_responses(model, self.tokenizer, prompts, spec, progress=False)
        tensors["prompt_index"] = rows
        return tensors

    def draw_e(self, model, n: int, seed: int) -> Batch:
        tensors = self._draw(model, plan_e(len(self.prompt_set), n, seed), seed)
        return Batch.from_tensors(tensors, self.temperature, self.top_p, _device(model))

    def draw_u(self, model, n: int, seed: int) -> Batch:
        rows = plan_u(len(self.prompt_set), n, seed).repeat_interleave(self.G)
        tensors = self._draw(model, rows, seed)
        answers = [self.prompt_set.answers[i] for i in rows.tolist()]
        rewards = torch.tensor(
            task.score_responses(self.reward_fn, decode_responses(self.tokenizer, tensors), answers),
            dtype=torch.float32,
        )
        tensors["rewards"] = rewards
        tensors["advantages"] = group_advantages(rewards.view(n, self.G), self.scale, self.eps).reshape(-1).float()
        tensors["group_index"] = torch.arange(n).repeat_interleave(self.G)
        return Batch.from_tensors(tensors, self.temperature, self.top_p, _device(model))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """a·b / (‖a‖ ‖b‖) in float64 (0 when either is 0)."""
    a, b = a.double(), b.double()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# one step


@dataclass
class Settings:
    """Everything per step that comes from params and the trainer's settings."""

    estimator: object  # EstimatorParams
    loss_agg_mode: str
    max_len: int | None
    max_grad_norm: float | None
    max_tokens: int
    B_E: int
    B_U: int
    trainer_B_U: int
    seed: int
    fd_eps: float
    second_order_fd_eps: float
    second_order_fraction: float
    second_order_z_resolve: float


class _Clock:
    """Calls a function and adds its wall time to `seconds[phase]` (for the log)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 2)


def _z(estimate: float, exact: float, se: float) -> float | None:
    return float(z_scores([estimate], [exact], [se])[0]) if se > 0 else None


def score_step(
    pair: StepPair,
    model,
    opt,
    model64,
    population: Population,
    sampler: Sampler,
    s: Settings,
    trainer_entropy: float | None,
    entropy: float | None,
) -> TrajectoryStep:
    """Every number of one TrajectoryStep. `model`: the float32 policy at θ(k) with `opt` its AdamW state;
    `model64` its float64 copy; `entropy`: exact H(θ(k)) when the previous step computed it."""
    named = dict(model.named_parameters())
    layout = FlatLayout.from_named(named, opt.names)
    delta_obs = observed_delta_theta(pair.this, pair.next, layout, adapter_parameter_names(model))
    lr = learning_rate_next(opt)[0]  # the lr of the step k → k+1 (the stored lr is the next step's)
    if not lr > 0:
        raise ProbeError(
            f"{pair.this} stores learning rate {lr} for its next step, so it took no step to score",
            "leave this pair out (trajectory.steps)",
        )
    clock = _Clock()
    exact = clock("exact", exact_along_step, model64, population, layout.unflatten(delta_obs), s.fd_eps, entropy)

    E = clock("sample", sampler.draw_e, model, s.B_E, derive_seed(s.seed, "trajectory E", pair.step))
    U1 = clock("sample", sampler.draw_u, model, s.B_U, derive_seed(s.seed, "trajectory U", pair.step, 1))
    U2 = clock("sample", sampler.draw_u, model, s.B_U, derive_seed(s.seed, "trajectory U", pair.step, 2))
    state = opt.flat(layout, {n: named[n].detach() for n in opt.names}, None)
    spec = UpdateSpec("adam_step", state, s.max_grad_norm, s.loss_agg_mode, s.max_len)
    pred = clock("delta_h1", compute_delta_h1, model, E, U1, layout, spec, s.estimator, s.max_tokens)
    pred2 = clock("delta_h1", compute_delta_h1, model, E, U2, layout, spec, s.estimator, s.max_tokens)
    obs = clock(
        "delta_h1", compute_delta_h1, model, E, None, layout, None, s.estimator, s.max_tokens, delta_theta=delta_obs
    )
    second = clock(
        "second_order",
        second_order,
        model,
        E,
        layout,
        delta_obs,
        s.estimator,
        s.max_tokens,
        lr=lr,
        fd_eps=s.second_order_fd_eps,
        fraction=s.second_order_fraction,
        z_resolve=s.second_order_z_resolve,
    )
    log.debug("trajectory: step %d phase seconds %s", pair.step, clock.seconds)
    se_u = pred["se_U"]
    se_pred = None
    if se_u is not None:
        se_pred = math.sqrt(pred["se_E"] ** 2 + se_u**2 * (1 + s.B_U / s.trainer_B_U))
    emul, emul2 = pred["delta_theta"], pred2["delta_theta"]
    norm_obs = float(delta_obs.norm())
    return TrajectoryStep(
        step=pair.step,
        next_step=pair.step + 1,
        checkpoint=str(pair.this),
        next_checkpoint=str(pair.next),
        learning_rate=lr,
        entropy=exact.entropy,
        entropy_next=exact.entropy_next,
        entropy_sampled=pred["entropy"],
        trainer_entropy=trainer_entropy,
        delta_h_obs=exact.delta_h_obs,
        delta_h_obs_method="exact",
        delta_h1_obs_exact=exact.delta_h1,
        delta_h2_obs_exact=exact.delta_h2,
        delta_h1_obs=obs["delta_h1"],
        se_delta_h1_obs=obs["se_E"],
        z_delta_h1_obs=_z(obs["delta_h1"], exact.delta_h1, obs["se_E"]),
        delta_h2_obs=second.delta_h2,
        se_delta_h2_obs=second.se_delta_h2,
        z_delta_h2_obs=_z(second.delta_h2, exact.delta_h2, second.se_delta_h2),
        delta_h1_pred=pred["delta_h1"],
        se_E=pred["se_E"],
        se_U=se_u,
        se_pred=se_pred,
        z=None if not se_pred else (exact.delta_h_obs - pred["delta_h1"]) / se_pred,
        delta_h1_pred_second_draw=pred2["delta_h1"],
        norm_delta_theta_obs=norm_obs,
        norm_ratio=float(emul.norm()) / norm_obs if norm_obs > 0 else 0.0,
        cos_emul_obs=cosine(emul, delta_obs),
        cos_emul_obs_second_draw=cosine(emul2, delta_obs),
        cos_emul_emul=cosine(emul, emul2),
    )


def calibration_of(steps: list[TrajectoryStep], b_u_probe: int, b_u_trainer: int) -> CalibrationMetrics:
    """The calibration summary over the steps that have every number (a step without SE_U has no z)."""
    zs = [s for s in steps if s.se_pred]
    h1 = [s.z_delta_h1_obs for s in steps if s.z_delta_h1_obs is not None]
    h2 = [s.z_delta_h2_obs for s in steps if s.z_delta_h2_obs is not None]
    summary = calibrate(
        delta_h_obs=[s.delta_h_obs for s in zs],
        delta_h1_pred=[s.delta_h1_pred for s in zs],
        se_E=[s.se_E for s in zs],
        se_U=[s.se_U for s in zs],
        b_u_probe=b_u_probe,
        b_u_trainer=b_u_trainer,
        delta_h1_obs_exact=[s.delta_h1_obs_exact for s in zs],
        delta_h2_obs_exact=[s.delta_h2_obs_exact for s in zs],
        z_delta_h1_obs=h1,
        z_delta_h2_obs=h2,
    )
    return CalibrationMetrics(**summary.as_dict())


# ----------------------------------------------------------------------------------------------
# the whole run


def _settings(params: Params, trainer: dict) -> Settings:
    mode, max_len, _ = resolve_loss_agg_mode(params.update.loss_agg_mode, trainer)
    clip = params.update.max_grad_norm
    if clip == "auto":
        clip = trainer.get("max_grad_norm") if trainer.get("max_grad_norm") is not None else HF_DEFAULT_MAX_GRAD_NORM
    tp, so = params.trajectory, params.second_order
    return Settings(
        estimator=params.estimator,
        loss_agg_mode=mode,
        max_len=max_len,
        max_grad_norm=clip,
        max_tokens=params.compute.max_tokens_per_microbatch,
        B_E=tp.B_E,
        B_U=tp.B_U,
        trainer_B_U=tp.trainer_B_U,
        seed=tp.seed,
        fd_eps=tp.fd_eps,
        second_order_fd_eps=so.fd_eps,
        second_order_fraction=so.fraction,
        second_order_z_resolve=so.z_resolve,
    )


def score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    """Load every θ(k) of `pairs` (with its AdamW state and the trainer's settings) and score its step."""
    with one_thread():  # many small float64 matmuls: one thread is as fast, and much faster on a busy CPU
        return _score_trajectory(params, pairs)


def _score_trajectory(params: Params, pairs: list[StepPair]) -> Trajectory:
    from .checkpoint import load_policy_model, load_tokenizer, resolve_paths
    from .generation import resolve_temperature
    from .optimizer_state import load_optimizer_state
    from .trainer_config import read_trainer_config

    ck = params.checkpoint
    first = resolve_paths(ck.model_copy(update={"path": str(pairs[0].this), "optimizer_path": None}))
    tokenizer = load_tokenizer(first)
    trainer = read_trainer_config(first, ck.trust_pickles)
    temperature, t_source = resolve_temperature(params.generation.temperature, trainer.get("temperature"))
    scale, _ = resolve_scale(params.advantage.scale, trainer.get("scale_rewards"))
    settings = _settings(params, trainer)
    population = population_of(params, tokenizer, temperature)
    sampler = Sampler(
        tokenizer,
        task.load_prompts(params.batch_config),
        temperature,
        params.generation.top_p,
        params.generation.max_new_tokens,
        params.generation.gen_batch_size,
        params.batch_config.G,
        task.get_reward_fn(params.batch_config.reward_fn),
        scale,
        params.advantage.eps,
    )
    log.info(
        "trajectory: %d steps of %s; target %s, T=%g (%s); exact H over %d prompts (%d sequences each evaluation)",
        len(pairs),
        params.trajectory.run_dir,
        params.estimator.entropy,
        temperature,
        t_source,
        len(population.prompts),
        population.n_sequences,
    )
    logged = trainer_entropy_log([p.next for p in pairs])
    steps, carried = [], {}  # carried: exact H(θ(k+1)) from step k, which is H(θ(k)) of step k+1
    for pair in pairs:
        start = time.perf_counter()
        paths = resolve_paths(ck.model_copy(update={"path": str(pair.this), "optimizer_path": None}))
        model = load_policy_model(ck, paths)
        opt = load_optimizer_state(model, paths)
        model64 = as_float64(copy.deepcopy(model))
        step = score_step(
            pair, model, opt, model64, population, sampler, settings, logged.get(pair.step + 1), carried.get(pair.step)
        )
        carried = {pair.step + 1: step.entropy_next}
        steps.append(step)
        log.info(
            "trajectory: step %d→%d  ΔH_obs %+.3e  δH₁_pred %+.3e ± %.1e  z %s  δH₁_obs %+.3e (exact %+.3e)  "
            "cos(emul, obs) %.2f vs %.2f  (%.1fs)",
            pair.step,
            pair.step + 1,
            step.delta_h_obs,
            step.delta_h1_pred,
            step.se_pred or float("nan"),
            "n/a" if step.z is None else f"{step.z:+.2f}",
            step.delta_h1_obs,
            step.delta_h1_obs_exact,
            step.cos_emul_obs,
            step.cos_emul_emul,
            time.perf_counter() - start,
        )
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


__all__ = [
    "ExactStep",
    "Population",
    "Sampler",
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
