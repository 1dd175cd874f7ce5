"""Typed, validated parameters: the one place where every knob and its default lives.

`load_params(path, overrides)` reads params.yaml, applies `-S key.path=value` overrides (values parsed
as YAML, like `dvc exp run -S`), and validates. An unknown or ill-typed key is a ProbeError naming it.
Every float, wherever it sits (a plain field, a union member, a list item), must be finite: NaN and ±inf
are refused once, for all sections, by `allow_inf_nan=False` on the base Section. Types are strict: a YAML
`true` is not the integer 1, `2.0` is not an int, a quoted "0.5" is not a number (a float key takes an int).
YAML is read with YAML 1.2's floats, as DVC reads params.yaml: `1e-5` is a number, not the string "1e-5".
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ProbeError

# params keys read while `recording_reads` is active (None: not recording). The pipeline test uses it to
# check that every params key a stage reads is one its dvc.yaml stage lists (so a change re-runs it).
_reads: set[str] | None = None


# the largest learning rate accepted (checkpoint.learning_rate, and the lr stored in a checkpoint): AdamW moves
# each parameter by about lr per step, so above 1 a step is no fine-tuning step (RL fine-tuning uses 1e-7..1e-3)
MAX_LEARNING_RATE = 1.0


def _finite_difference_step(low: str, high: str, section: str):
    """A finite-difference step h (a multiple of Δθ) refused outside [low, high], the range where the central
    difference is valid (docs/math.md §5.6, §7.3, §11: round-off grows as h falls, truncation as h grows)."""

    def check(value: float) -> float:
        if not float(low) <= value <= float(high):
            raise ValueError(
                f"must be in [{low}, {high}], where the central difference is valid (docs/math.md {section})"
            )
        return value

    return Annotated[float, AfterValidator(check)]


# exact.fd_eps: float64 slope, round-off ~ε_mach·H/h, truncation ~h²·f‴/6
ExactStep = _finite_difference_step("1e-6", "0.1", "§7.3")
# second_order.fd_eps: δH₂ from float32 passes at θ ± εΔθ, rounding of the shift ~1/ε, bias ~ε²
SecondOrderStep = _finite_difference_step("1e-4", "0.1", "§5.6")
# trajectory.fd_eps: float64 δH₁ and δH₂, δH₂'s round-off ~ε_mach·H/h²
TrajectoryStep = _finite_difference_step("1e-4", "0.1", "§11")


class Section(BaseModel):
    # allow_inf_nan=False: YAML's .nan/.inf (or "nan") in any float field is a validation error;
    # strict: no coercion of a YAML value (true -> 1, 2.0 -> 2, "0.5" -> 0.5); a float field still takes an int
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if _reads is not None and name in type(self).model_fields and not isinstance(value, Section):
            _reads.add(_key(type(self), name))
        return value

    def model_dump(self, *args, **kwargs) -> dict:
        if _reads is not None:  # a whole section handed on (e.g. recorded in an artifact): every key is read
            _reads.update(_key(type(self), name) for name in type(self).model_fields)
        return super().model_dump(*args, **kwargs)


class DemoParams(Section):
    """The embedded demo: tiny tokenizer + Qwen2, synthetic arithmetic, SFT warm-up, GRPO with LoRA (or full
    fine-tuning)."""

    out_dir: str = "data/demo"
    seed: int = 0
    max_operand: int = Field(9, ge=1, le=49)
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    warmup_steps: int = Field(85, ge=0)  # stopped early: reward rate at T=1 about 0.45 (seed 0)
    warmup_lr: float = Field(1e-3, gt=0)
    rl_steps: int = Field(13, ge=1)  # 12 consecutive checkpoint pairs for the trajectory
    rl_lr: float = Field(5e-3, gt=0)
    rl_weight_decay: float = Field(0.01, ge=0)
    save_steps: int = Field(1, ge=1)  # every step: the trajectory scores each step the trainer took
    finetune: Literal["lora", "full"] = "lora"  # full: every parameter trained (no adapter; lora_rank unused)
    tie_word_embeddings: bool = False  # true: the head is the embedding matrix, as in Qwen2.5-0.5B
    lora_rank: int = Field(4, ge=1)
    num_generations: int = Field(4, ge=2)
    prompts_per_step: int = Field(8, ge=1)


class CheckpointParams(Section):
    """Which checkpoint to probe and how to load it (keys from the seed note where they exist)."""

    path: str = "data/demo/run/checkpoint-6"
    format: Literal["auto", "peft-adapter", "full-model", "deepspeed-zero", "verl-fsdp", "accelerate-fsdp"] = (
        "auto"  # auto: from the files (README, "Formats")
    )
    base_model: str | None = None  # local dir or hub id; default: adapter_config.json's base (adapters only)
    optimizer_path: str | None = None  # default: optimizer.pt in/beside/above `path`
    use_qlora: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    device_map: Literal["auto", "cpu", "cuda"] = "auto"
    use_checkpointing: bool = False
    trust_pickles: bool = False  # unpickle training_args.bin (arbitrary code!) only when true
    learning_rate: Literal["next", "last"] | float = "next"  # next: the optimizer's; last: trainer_state's
    # the KL penalty's reference policy for a full-parameter run (local dir or hub id; TRL's: the model the run
    # started from); null: a LoRA run's base with the adapter off, and a full-parameter run with a KL penalty refused
    kl_reference: str | None = None

    @field_validator("learning_rate")
    @classmethod
    def _positive_learning_rate(cls, v):
        if not isinstance(v, str) and not 0 < v <= MAX_LEARNING_RATE:
            raise ValueError(
                f"must be 'next', 'last' or a number in (0, {MAX_LEARNING_RATE:g}] "
                "(a larger step size is not an RL fine-tuning learning rate)"
            )
        return v


class BatchParams(Section):
    B_E: int = Field(64, ge=1)
    B_U: int = Field(8, ge=1)
    G: int = Field(4, ge=2)
    dataset_name: str = "data/demo/prompts.jsonl"  # demo | local .jsonl/.parquet | hub name
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str | None = None  # e.g. "Q: {prompt}\nA:"; must contain {prompt}
    reward_fn: str = "exact_number"  # registry name or dotted path "pkg.mod:function"

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, v: str | None) -> str | None:
        if v is not None and "{prompt}" not in v:
            raise ValueError("must contain '{prompt}'")
        return v


class GenerationParams(Section):
    temperature: float | Literal["auto"] = "auto"  # auto: the trainer's, else 1.0
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(3, ge=1)
    gen_batch_size: int = Field(64, ge=1)
    stop: str | None = None  # optional stop string per task
    # sampling knobs the probe does not apply (it samples and scores π_θ at temperature T with top_p only);
    # auto: the trainer's value, else off. A value other than off (the trainer's or this one) is refused; an
    # explicit off value probes the untruncated policy even where the trainer sampled otherwise (a warning)
    top_k: int | Literal["auto"] = "auto"  # off: 0
    min_p: float | Literal["auto"] = "auto"  # off: 0.0
    repetition_penalty: float | Literal["auto"] = "auto"  # off: 1.0

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be > 0 or 'auto'")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be >= 0 (0: no top-k filtering) or 'auto'")
        return v

    @field_validator("min_p")
    @classmethod
    def _min_p(cls, v):
        if v != "auto" and not 0 <= v <= 1:
            raise ValueError("must be in [0, 1] (0: no min-p filtering) or 'auto'")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v):
        if v != "auto" and not v > 0:
            raise ValueError("must be > 0 (1: no penalty) or 'auto'")
        return v


class SamplingParams(Section):
    checkpoint: str | None = None  # the checkpoint that draws E and U; default: checkpoint.path
    seed_e: int = 1
    seed_u: int = 2


class AdvantageParams(Section):
    scale: bool | Literal["auto"] = "auto"  # divide by group std + eps; auto: the trainer's setting
    eps: float = Field(1e-4, ge=0)  # TRL uses 1e-4 (with the unbiased group std)


class EstimatorParams(Section):
    entropy: Literal["sequence", "token_mean", "seq_mean_token_mean"] = "token_mean"
    baseline: Literal["none", "mean", "regression"] = "mean"
    ridge: float = Field(1.0, ge=0)  # regression baseline: ridge on [H_k, top1_prob, margin, log(1+k), 1]
    crossfit_folds: int = Field(5, ge=2)  # regression baseline is fitted on the other folds only


class UpdateParams(Section):
    rule: Literal["adam_step", "adam_precond", "sgd", "observed"] = "adam_step"  # observed: θ(next) − θ(this)
    loss_agg_mode: Literal[
        "auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "auto"
    max_grad_norm: float | Literal["auto"] | None = "auto"  # auto: the trainer's; null or 0: no clipping
    next_checkpoint: str | None = None  # rule observed: the checkpoint after checkpoint.path (None: next checkpoint-N)
    # several AdamW steps per U batch (docs/math.md §4.10): U split into mini_batches, passed over `epochs` times,
    # the clipped ratio active after the first step. auto: the trainer's (TRL: steps_per_generation ÷
    # gradient_accumulation_steps mini-batches, num_iterations epochs), else 1 and 1
    mini_batches: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    clip_ratio: list[float] | Literal["auto"] = "auto"  # [ε_low, ε_high]; auto: the trainer's, else 0.2 and 0.2
    # the trainer's loss beyond the policy-gradient term (docs/math.md §12): J + β_H·H over U's tokens, and a
    # token mask dropping the policy-gradient term of a fraction of U's tokens (Clip-Cov: top_cov)
    entropy_coef: float = 0.0
    token_mask: Literal["none", "top_cov", "top_entropy", "bottom_entropy"] = "none"
    token_mask_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    # the KL penalty's β_KL: J − β_KL·KL(π_θ ‖ π_ref) (k3 estimate) over U's tokens, reference = the base with the
    # adapter off (LoRA only); auto: the trainer's beta (TRL), 0 when not recorded
    kl_coef: float | Literal["auto"] = "auto"

    @field_validator("clip_ratio")
    @classmethod
    def _clip_range(cls, v):
        if v != "auto" and (len(v) != 2 or not all(0 <= e for e in v) or not v[0] < 1):
            raise ValueError("must be 'auto' or [ε_low, ε_high] with 0 ≤ ε_low < 1 and ε_high ≥ 0")
        return v

    @field_validator("max_grad_norm")
    @classmethod
    def _clip_norm(cls, v):
        # the HF Trainer reads a negative norm as "no clipping"; here that must be said with null or 0
        if v not in ("auto", None) and v < 0:
            raise ValueError("must be > 0, 'auto', or null/0 for no clipping")
        return v


class ComputeParams(Section):
    max_tokens_per_microbatch: int = Field(4096, ge=1)
    # MiB of float32 [tokens × vocabulary] logits per chunk of teacher forcing's LM head / softmax / entropy:
    # 256 = 441 tokens at Qwen2.5's vocabulary of 151,936 (a few such blocks are alive at once)
    logits_chunk_mb: float = Field(256.0, gt=0)
    # false: the E pass is one ordinary backward for estimator.entropy (hooks, the memory of a training step);
    # true: per-token tangents by double backward, so delta_h1.json also has the other two targets and the
    # naive (surprisal) estimate, at about twice the E pass's memory
    all_targets: bool = False
    # keep per-prompt-group U gradients (B_U × trainable parameters) when they fit in this many MiB: SE_U by a
    # jackknife over groups through the real update rule, and no third pass; 0 = never (delta method)
    u_gradient_cache_mb: float = Field(4096.0, ge=0)
    # under torchrun, how the policy is held: none = a whole copy per process (rows split, sums all-reduced);
    # fsdp = FSDP2-sharded, with X̄, Δθ and the AdamW state (entropy_probe/sharded.py: what it computes)
    shard: Literal["none", "fsdp"] = "none"


class ExactParams(Section):
    max_sequences: int = Field(500_000, ge=1)  # refuse beyond this many continuations (demo: ~90 prompts × 3616)
    eta_multipliers: list[float] = [0.25, 0.5, 1.0, 2.0, 4.0]
    fd_eps: ExactStep = 1e-3  # h of the slope (H(θ + hΔθ) − H(θ − hΔθ)) / 2h
    prompts_per_chunk: int = Field(16, ge=1)  # prompts enumerated together (bounds the autograd graph)


class PathsParams(Section):
    """Where each stage writes (and later stages read). `--out` replaces the running stage's own."""

    verify: str = "data/verify"
    sample_e: str = "data/sample_e"
    sample_u: str = "data/sample_u"
    delta_h1: str = "data/delta_h1"
    exact: str = "data/exact"
    truth: str = "data/truth"
    whatif: str = "data/whatif"
    report: str = "data/report"


class TruthParams(Section):
    """Ground truth ΔH(η) for η = multiplier × lr, θ' = θ + (η/lr)·Δθ."""

    eta_multipliers: list[float] = [0.25, 0.5, 1.0, 2.0, 4.0]
    fresh_samples: bool = True  # (b): fresh samples under θ and θ' with common random numbers
    seed: int = 3  # seed of the fresh samples (θ and θ' share it)


class ProbeCheckpoint(Section):
    name: str  # short label, used for output dirs data/probe/<name>/
    path: str


class ProbeParams(Section):
    """Checkpoints probed with one sample set (empty: only checkpoint.path).

    In params.yaml a mapping {name: path} (DVC's foreach names the stages after it, e.g. delta-h1@step4);
    in Python a list of ProbeCheckpoint(name, path), in the mapping's order.
    """

    checkpoints: list[ProbeCheckpoint] = []
    root: str = "data/probe"  # per-checkpoint outputs: <root>/<name>/{verify,delta_h1,exact,truth}

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _mapping_to_list(cls, v):
        if isinstance(v, dict):
            return [{"name": str(name), "path": path} for name, path in v.items()]
        return v


class ReuseParams(Section):
    """Cached sample reuse: probing a checkpoint other than the sampler importance-weights the samples."""

    min_ess_fraction: float = Field(0.3, ge=0, le=1)  # refuse when ESS/N falls below this
    force: bool = False  # compute anyway below the threshold (the ESS is still reported)


class SecondOrderParams(Section):
    """The second-order term δH₂ = ½ Δθᵀ∇²HΔθ from the E samples and the linear-regime step size (docs/math.md §5.6)."""

    enabled: bool = True  # false: skip δH₂ (it costs two more E passes, at θ ± εΔθ, and three re-scorings)
    fd_eps: SecondOrderStep = 0.01  # finite-difference step ε as a multiple of Δθ: D at θ ± εΔθ
    fraction: float = Field(0.1, gt=0)  # f: s* is where |s² δH₂| = f·|s δH₁|; η* = s*·lr
    z_resolve: float = Field(2.0, gt=0)  # δH₂ counts as resolved from 0 when |δH₂| > z_resolve · SE


class TrajectoryParams(Section):
    """Scoring the probe against a run's own steps: every consecutive checkpoint pair (k, k+1) of run_dir."""

    run_dir: str = "data/demo/run"  # a Trainer output dir holding checkpoint-N/ saved every step
    out_dir: str = "data/trajectory"
    steps: list[int] | None = None  # the k of the pairs to score (None: every consecutive pair)
    B_E: int = Field(64, ge=2)  # E batch drawn at every θ(k)
    B_U: int | Literal["auto"] = "auto"  # the probe's U pool per step (auto: 4 × trainer_B_U), G from batch_config
    trainer_B_U: int | Literal["auto"] = "auto"  # the trainer's prompts per step (auto: from its settings)
    trainer_draws: int = Field(16, ge=2)  # K simulated trainer steps per forecast (each with its δH₂)
    # draws whose δH₂ gets its own finite difference (2 E backward passes each); the others share one around the
    # mean step, corrected by these (docs/math.md §11.4): faster at real size, a little less sharp. None: every draw
    exact_draws: Annotated[int, Field(ge=1)] | None = None
    observed: Literal["exact", "sampled", "auto"] = "auto"  # ΔH_obs (auto: exact when enumeration fits)
    B_obs: int = Field(256, ge=2)  # sampled ΔH_obs: E rows at θ(k), and one fresh response each at θ(k), θ(k+1)
    seed: int = 4
    fd_eps: TrajectoryStep = 0.01  # exact δH₁, δH₂ by central differences at θ(k) ± fd_eps·Δθ_obs

    @field_validator("B_U", "trainer_B_U")
    @classmethod
    def _batch(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be ≥ 1 or 'auto'")
        return v


LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
TokenMask = Literal["none", "top_cov", "top_entropy", "bottom_entropy"]


class WhatIfRow(Section):
    """One alternative update: the settings it changes from params `update` / `advantage` (None: unchanged)."""

    name: str
    lr_scale: Annotated[float, Field(gt=0)] | None = None  # the learning rate times this
    loss_agg_mode: LossAggMode | None = None
    max_grad_norm: Annotated[float, Field(ge=0)] | None = None  # 0: no clipping
    advantage_scale: bool | None = None  # divide the advantages by the group's reward std (recomputed from rewards)
    entropy_coef: float | None = None
    token_mask: TokenMask | None = None
    token_mask_fraction: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    kl_coef: float | None = None


def _default_whatif_rows() -> list[WhatIfRow]:
    return [
        WhatIfRow(name="half the learning rate", lr_scale=0.5),
        WhatIfRow(name="seq-mean-token-mean", loss_agg_mode="seq-mean-token-mean"),
        WhatIfRow(name="no std scaling of A", advantage_scale=False),
        WhatIfRow(name="clip at 0.1", max_grad_norm=0.1),
        WhatIfRow(name="entropy bonus 0.01", entropy_coef=0.01),
        WhatIfRow(name="drop the top 5% cov tokens", token_mask="top_cov", token_mask_fraction=0.05),
        WhatIfRow(name="drop the top 20% entropy tokens", token_mask="top_entropy", token_mask_fraction=0.2),
        WhatIfRow(name="drop the bottom 80% entropy tokens", token_mask="bottom_entropy", token_mask_fraction=0.8),
    ]


class WhatIfParams(Section):
    """Per-token attribution of δH₁ over U and alternative updates from the same X̄ (docs/math.md §12)."""

    target: float = 0.0  # the entropy-neutral setting: the entropy bonus β_H (and lr) at which δH₁ = target
    forking_fraction: float = Field(0.2, gt=0, le=1)  # "forking" tokens: this top fraction of U's tokens by H
    clip_cov_fraction: float = Field(0.05, gt=0, le=1)  # the share of δH₁ in this top fraction by covariance
    top_tokens: int = Field(10, ge=1)  # tokens listed as lowering entropy most
    rows: list[WhatIfRow] = Field(default_factory=_default_whatif_rows)

    @field_validator("rows")
    @classmethod
    def _distinct_names(cls, rows):
        names = [r.name for r in rows]
        taken = next((n for n in names if names.count(n) > 1 or n in ("configured", "entropy-neutral")), None)
        if taken is not None:
            raise ValueError(f"row name '{taken}' is used twice or reserved (configured, entropy-neutral)")
        return rows


class Params(Section):
    paths: PathsParams = PathsParams()
    demo: DemoParams = DemoParams()
    checkpoint: CheckpointParams = CheckpointParams()
    batch_config: BatchParams = BatchParams()
    generation: GenerationParams = GenerationParams()
    sampling: SamplingParams = SamplingParams()
    advantage: AdvantageParams = AdvantageParams()
    estimator: EstimatorParams = EstimatorParams()
    update: UpdateParams = UpdateParams()
    compute: ComputeParams = ComputeParams()
    exact: ExactParams = ExactParams()
    truth: TruthParams = TruthParams()
    probe: ProbeParams = ProbeParams()
    reuse: ReuseParams = ReuseParams()
    trajectory: TrajectoryParams = TrajectoryParams()
    second_order: SecondOrderParams = SecondOrderParams()
    whatif: WhatIfParams = WhatIfParams()


def _key(section: type, name: str) -> str:
    """The params key of field `name` of a section class: 'estimator.entropy'; a probe checkpoint's fields
    all count as 'probe.checkpoints'."""
    if section is ProbeCheckpoint:
        return "probe.checkpoints"
    if section is WhatIfRow:
        return "whatif.rows"
    for top, field in Params.model_fields.items():
        if field.annotation is section:
            return f"{top}.{name}"
    return name  # a field of Params itself


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Collect the params keys read inside the block (leaf keys, e.g. 'generation.top_p')."""
    global _reads
    _reads = set()
    try:
        yield _reads
    finally:
        _reads = None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ProbeError(f"cannot set '{dotted}': '{key}' is not a section", "check the key path")
    node[leaf] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string,
    which a strict float key would then refuse; DVC (ruamel, YAML 1.2) reads it as the number it looks like."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only, no Python objects


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', yaml-parsed value)."""
    if "=" not in text:
        raise ProbeError(f"bad override '{text}'", "use -S key.path=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), _yaml_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Params:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ProbeError(f"params file {path} not found", "pass --params FILE or run from the repo root")
        try:
            tree = _yaml_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProbeError(f"params file {path} is not valid YAML ({exc.__class__.__name__})") from exc
        tree = {} if tree is None else tree
        if not isinstance(tree, dict):
            raise ProbeError(
                f"params file {path} holds a YAML {type(tree).__name__}, not a mapping of sections",
                "write it as `section:` blocks of `key: value` lines, like params.yaml",
            )
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    return validate_params(tree)


def _key_path(loc: tuple) -> str:
    """The params key of a validation error (pydantic appends union member tags such as 'float')."""
    keys, model = [], Params
    for part in loc:
        keys.append(str(part))
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            break
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            break
    return ".".join(keys)


def _message(err: dict) -> str:
    """pydantic's message, with why a value that looks right is refused (strict types)."""
    msg = err["msg"].removeprefix("Value error, ")
    value = err["input"]
    if isinstance(value, bool) and err["type"] in ("int_type", "float_type"):
        return f"{msg} (true/false is a boolean, not a number)"
    if isinstance(value, float) and err["type"] == "int_type":
        return f"{msg} (write it without a decimal point)"
    if isinstance(value, str) and err["type"] in ("int_type", "float_type", "bool_type"):
        return f"{msg} (a quoted value is text: write it without quotes)"
    return msg


def validate_params(tree: dict) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        key = _key_path(err["loc"])
        if err["type"] == "extra_forbidden":
            raise ProbeError(f"unknown params key '{key}'", "check the spelling against params.yaml") from None
        # a union field fails once per member ("should be 'auto'", "should be a finite number"): say them all
        msgs = list(dict.fromkeys(_message(e) for e in errors if _key_path(e["loc"]) == key))
        value = repr(err["input"])
        value = value if len(value) <= 60 else value[:57] + "..."
        raise ProbeError(
            f"bad value {value} for params key '{key}': {'; or '.join(msgs)}", "fix it in params.yaml or -S"
        ) from None
