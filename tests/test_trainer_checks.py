"""The probe's settings against the trainer's: the trainer's prompts per step from real TRL GRPOConfig objects,
sampling knobs the probe does not apply (top_k, min_p, repetition_penalty) refused unless off, and every
probe/trainer mismatch named with both values — an error where it changes what ΔH_obs measures and the probe
is scored against the trainer's own steps, a warning otherwise. No model is trained here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from entropy_probe.checkpoint import TRAINER_CONFIG, CheckpointPaths
from entropy_probe.errors import ProbeError
from entropy_probe.params import GenerationParams, Params, load_params, validate_params
from entropy_probe.trainer_checks import (
    check_against_trainer,
    resolve_sampling_knobs,
    trainer_processes,
    trainer_prompts_per_step,
)
from entropy_probe.trainer_config import (
    TRAINER_CONFIG_KEYS,
    TrainerConfig,
    TrainerSettings,
    read_trainer_config,
    trainer_config_from_args,
)

REPO = Path(__file__).resolve().parents[1]
LOGGER = "entropy_probe.trainer_checks"
NEW_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "generation_batch_size",
    "top_k",
    "min_p",
    "repetition_penalty",
)


def grpo(tmp_path: Path, **kw) -> TrainerConfig:
    """The TrainerConfig of a real trl.GRPOConfig, through trainer_config_from_args (as the demo saves it)."""
    from trl import GRPOConfig

    kw = {"per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 3, **kw}
    args = GRPOConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", **kw)
    raw = json.loads(json.dumps(trainer_config_from_args(args)))  # what trainer_config.json holds
    return TrainerConfig.model_validate(raw)


def probe_params(**generation) -> Params:
    """The shipped defaults matched to `grpo`'s config: G 4, 3 new tokens, temperature auto, top_p 1."""
    return validate_params({"batch_config": {"G": 4}, "generation": {"max_new_tokens": 3, **generation}})


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- prompts per step


@pytest.mark.parametrize(
    "per_device, accumulation, G, steps_per_generation, prompts",
    [
        (8, 1, 4, None, 2),  # the demo's layout: one micro-batch of whole groups
        (4, 3, 4, None, 3),  # groups split over micro-batches: steps_per_generation defaults to 3
        (6, 2, 3, None, 4),
        (8, 4, 4, 2, 8),  # two generations per step
        (16, 1, 8, None, 2),
    ],
)
def test_prompts_per_step_from_real_grpo_configs(tmp_path, per_device, accumulation, G, steps_per_generation, prompts):
    kw = {} if steps_per_generation is None else {"steps_per_generation": steps_per_generation}
    cfg = grpo(
        tmp_path,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_generations=G,
        **kw,
    )
    assert trainer_prompts_per_step(cfg) == prompts == per_device * accumulation // G
    # TRL's defaults: steps_per_generation = gradient_accumulation_steps, one generation batch = one process's
    # per_device × steps_per_generation completions, each drawn batch used once
    assert cfg.steps_per_generation == (steps_per_generation or accumulation)
    assert cfg.generation_batch_size == per_device * cfg.steps_per_generation and cfg.num_iterations == 1
    assert trainer_processes(cfg) == 1


def test_a_step_of_partial_groups_is_refused_naming_the_numbers(tmp_path):
    # valid for TRL (its generation batch of 2 x 2 = 4 completions holds whole groups), but one step uses only 2
    cfg = grpo(tmp_path, per_device_train_batch_size=2, num_generations=4, steps_per_generation=2)
    with pytest.raises(ProbeError) as err:
        trainer_prompts_per_step(cfg)
    message = one_line(err)
    assert "per_device_train_batch_size=2" in message and "gradient_accumulation_steps=1" in message
    assert "num_generations=4" in message and "2 completions" in message


def test_prompts_per_step_counts_every_process(tmp_path):
    # what TRL stores for 2 processes: generation_batch_size = per_device x world_size x steps_per_generation
    two = TrainerConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        generation_batch_size=4,
        num_generations=4,
    )
    assert trainer_processes(two) == 2 and trainer_prompts_per_step(two) == 1
    # without generation_batch_size the count of processes is unknown: one is assumed
    assert trainer_processes(two.model_copy(update={"generation_batch_size": None})) is None
    assert trainer_prompts_per_step(two.model_copy(update={"num_generations": 2, "generation_batch_size": None})) == 1
    with pytest.raises(ProbeError, match="generation_batch_size=5"):
        trainer_processes(two.model_copy(update={"generation_batch_size": 5}))


def test_unknown_batch_settings_give_none(tmp_path):
    from transformers import TrainingArguments

    assert trainer_prompts_per_step(TrainerConfig()) is None
    # a plain (non-GRPO) trainer: batch known, groups and sampling knobs unknown (None, not "off")
    raw = trainer_config_from_args(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    cfg = TrainerConfig.model_validate(raw)
    assert cfg.per_device_train_batch_size == 8 and cfg.gradient_accumulation_steps == 1
    assert cfg.num_generations is None and trainer_prompts_per_step(cfg) is None
    assert cfg.top_k is None and cfg.min_p is None and cfg.repetition_penalty is None


# ---------------------------------------------------------------------------------------------- saved settings


def test_trl_sampling_defaults_are_stored_as_off_and_generation_kwargs_override(tmp_path):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", num_generations=4)
    assert args.min_p is None and args.top_k == 0 and args.repetition_penalty == 1.0  # TRL: None/0/1 = off
    cfg = TrainerConfig.model_validate(trainer_config_from_args(args))
    assert (cfg.top_k, cfg.min_p, cfg.repetition_penalty) == (0, 0.0, 1.0)
    # generation_kwargs win over the named arguments when TRL builds its GenerationConfig / vLLM SamplingParams
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        num_generations=4,
        top_k=0,
        generation_kwargs={"top_k": 20, "min_p": None, "repetition_penalty": 1.2},
    )
    cfg = TrainerConfig.model_validate(trainer_config_from_args(args))
    assert (cfg.top_k, cfg.min_p, cfg.repetition_penalty) == (20, 0.0, 1.2)


def test_the_demos_trainer_config_validates_and_matches_the_shipped_params(tmp_path):
    from entropy_probe.demo import grpo_config

    params = load_params(REPO / "params.yaml")
    raw = trainer_config_from_args(grpo_config(params.demo, tmp_path / "run"))
    cfg = TrainerConfig.model_validate(json.loads(json.dumps(raw)))
    assert all(getattr(cfg, k) is not None for k in TRAINER_CONFIG_KEYS)
    assert trainer_prompts_per_step(cfg) == params.demo.prompts_per_step
    assert resolve_sampling_knobs(params.generation, cfg)["top_k"] == 0
    assert check_against_trainer(params, cfg, scoring_observed_steps=True) == []


def _paths(ckpt: Path) -> CheckpointPaths:
    return CheckpointPaths(
        weights_dir=ckpt,
        optimizer_path=ckpt / "optimizer.pt",
        scheduler_path=None,
        trainer_state_path=None,
        training_args_path=None,
        base_model=str(ckpt),
        name_map_path=None,
        trainer_config_path=ckpt / TRAINER_CONFIG,
    )


def test_an_old_trainer_config_json_without_the_new_keys_still_loads(tmp_path):
    old = {
        "loss_type": "dapo",
        "scale_rewards": "group",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_grad_norm": 1.0,
        "beta": 0.0,
        "max_completion_length": 3,
        "num_generations": 4,
        "learning_rate": 0.005,
        "lr_scheduler_type": "linear",
    }  # as the demo wrote it before these keys existed
    assert set(NEW_KEYS) <= set(TRAINER_CONFIG_KEYS) and not set(NEW_KEYS) & set(old)
    (tmp_path / TRAINER_CONFIG).write_text(json.dumps(old))
    raw = read_trainer_config(_paths(tmp_path), trust_pickles=False)
    settings = TrainerSettings.of(raw)
    assert settings.source == TRAINER_CONFIG and settings.config.num_generations == 4
    assert all(getattr(settings.config, k) is None for k in NEW_KEYS)
    assert trainer_prompts_per_step(settings.config) is None
    assert resolve_sampling_knobs(GenerationParams(), settings.config)["min_p"] == 0.0
    assert check_against_trainer(probe_params(), settings.config, scoring_observed_steps=True) == []


@pytest.mark.parametrize(
    "content, key",
    [
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"num_iterations": 0}, "num_iterations"),
        ({"per_device_train_batch_size": 2.0}, "per_device_train_batch_size"),
        ({"top_k": "50"}, "top_k"),
    ],
)
def test_a_bad_new_key_in_trainer_config_json_is_refused(tmp_path, content, key):
    (tmp_path / TRAINER_CONFIG).write_text(json.dumps(content))
    with pytest.raises(ProbeError, match=f"bad trainer setting '{key}'"):
        read_trainer_config(_paths(tmp_path), trust_pickles=False)


# ---------------------------------------------------------------------------------------------- sampling knobs


@pytest.mark.parametrize(
    "knob, trainer_value, off",
    [("top_k", 50, 0), ("min_p", 0.1, 0.0), ("repetition_penalty", 1.1, 1.0)],
)
def test_a_non_neutral_trainer_knob_is_refused_unless_set_off_explicitly(tmp_path, caplog, knob, trainer_value, off):
    cfg = grpo(tmp_path, **{knob: trainer_value})
    assert getattr(cfg, knob) == trainer_value
    with pytest.raises(ProbeError) as err:
        resolve_sampling_knobs(GenerationParams(), cfg)
    message = one_line(err)
    assert f"the trainer's {knob} = {trainer_value!r}" in message and "temperature T" in message
    assert f"generation.{knob}: {off}" in message
    # explicitly off: the untruncated policy is probed, with a warning naming both values
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        knobs = resolve_sampling_knobs(GenerationParams(**{knob: off}), cfg)
    assert knobs[knob] == off and knobs[f"{knob}_source"] == f"params generation.{knob}"
    (warning,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert f"generation.{knob} = {off!r}" in warning and f"{knob} = {trainer_value!r}" in warning


@pytest.mark.parametrize("knob, value", [("top_k", 5), ("min_p", 0.05), ("repetition_penalty", 0.9)])
def test_a_non_neutral_params_knob_is_refused(tmp_path, knob, value):
    for cfg in (TrainerConfig(), grpo(tmp_path)):  # trainer unknown, or off
        with pytest.raises(ProbeError) as err:
            resolve_sampling_knobs(GenerationParams(**{knob: value}), cfg)
        message = one_line(err)
        assert f"params generation.{knob} = {value!r}" in message and f"generation.{knob}: auto" in message


def test_neutral_knobs_resolve_quietly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        from_trainer = resolve_sampling_knobs(GenerationParams(), grpo(tmp_path))
        unknown = resolve_sampling_knobs(GenerationParams(), TrainerConfig())
        explicit = resolve_sampling_knobs(GenerationParams(top_k=0, min_p=0.0, repetition_penalty=1.0), TrainerConfig())
    for knobs in (from_trainer, unknown, explicit):
        assert (knobs["top_k"], knobs["min_p"], knobs["repetition_penalty"]) == (0, 0.0, 1.0)
    assert from_trainer["top_k_source"] == "the trainer's top_k" and "not recorded" in unknown["min_p_source"]
    assert not [r for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize(
    "key, value", [("top_k", -1), ("top_k", True), ("top_k", 2.0), ("min_p", 1.5), ("repetition_penalty", 0)]
)
def test_bad_generation_knobs_are_refused(key, value):
    with pytest.raises(ProbeError, match=f"params key 'generation.{key}'"):
        validate_params({"generation": {key: value}})


def test_the_shipped_params_leave_the_knobs_to_the_trainer():
    gen = load_params(REPO / "params.yaml").generation
    assert (gen.top_k, gen.min_p, gen.repetition_penalty) == ("auto", "auto", "auto")


# ---------------------------------------------------------------------------------------------- cross-check


def test_matching_settings_give_no_warnings(tmp_path, caplog):
    cfg = grpo(tmp_path, temperature=0.7, top_p=0.9)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for params in (probe_params(top_p=0.9), probe_params(top_p=0.9, temperature=0.7)):
            for scoring in (True, False):
                assert check_against_trainer(params, cfg, scoring_observed_steps=scoring) == []
    assert not caplog.records


# (trainer settings, params.generation, fragments every message holds) — each changes the estimand of ΔH_obs
ESTIMAND = [
    ({"max_completion_length": 16}, {}, ["generation.max_new_tokens=3", "max_completion_length=16"]),
    ({"temperature": 0.7}, {"temperature": 1.0}, ["generation.temperature=1", "temperature=0.7"]),
    ({"top_p": 0.9}, {}, ["generation.top_p=1", "top_p=0.9"]),
]


@pytest.mark.parametrize("trainer, generation, fragments", ESTIMAND)
def test_an_estimand_mismatch_refuses_scoring_observed_steps_and_warns_otherwise(
    tmp_path, caplog, trainer, generation, fragments
):
    cfg, params = grpo(tmp_path, **trainer), probe_params(**generation)
    with pytest.raises(ProbeError) as err:
        check_against_trainer(params, cfg, scoring_observed_steps=True)
    message = one_line(err)
    assert all(f in message for f in fragments) and "ΔH_obs" in message, message
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        (warning,) = check_against_trainer(params, cfg, scoring_observed_steps=False)
    assert all(f in warning for f in fragments) and "\n" not in warning
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [warning]


def test_every_estimand_mismatch_is_in_the_one_error(tmp_path):
    cfg = grpo(tmp_path, max_completion_length=16, temperature=0.7, top_p=0.9)
    with pytest.raises(ProbeError) as err:
        check_against_trainer(probe_params(temperature=1.0), cfg, scoring_observed_steps=True)
    message = one_line(err)
    assert all(f in message for _, _, fragments in ESTIMAND for f in fragments)


def test_temperature_auto_follows_the_trainer(tmp_path):
    cfg = grpo(tmp_path, temperature=0.7)
    assert check_against_trainer(probe_params(temperature="auto"), cfg, scoring_observed_steps=True) == []


def test_a_group_size_mismatch_is_a_warning_naming_both_values(tmp_path, caplog):
    cfg = grpo(tmp_path, num_generations=8)
    params = probe_params()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for scoring in (True, False):
            (warning,) = check_against_trainer(params, cfg, scoring_observed_steps=scoring)
            assert "batch_config.G=4" in warning and "num_generations=8" in warning
            assert "set batch_config.G: 8" in warning
    assert len([r for r in caplog.records if r.name == LOGGER]) == 2


@pytest.mark.parametrize(
    "batch, fragments",
    [
        # one generation spans two steps: the second step uses completions drawn before the first
        ({"gradient_accumulation_steps": 1, "steps_per_generation": 2}, ["steps_per_generation=2", "earlier θ"]),
        ({"num_iterations": 2}, ["num_iterations=2", "gradient_accumulation_steps=1", "earlier θ"]),
        ({"gradient_accumulation_steps": 3, "steps_per_generation": 2}, ["steps_per_generation=2", "earlier θ"]),
        # μ passes within one step: on-policy, but each group counted twice
        (
            {"gradient_accumulation_steps": 4, "steps_per_generation": 2, "num_iterations": 2},
            ["num_iterations=2", "4 distinct prompts, not 8", "trajectory.trainer_B_U: 4"],
        ),
    ],
)
def test_reused_completions_are_a_warning(tmp_path, batch, fragments):
    cfg = grpo(tmp_path, **batch)
    for scoring in (True, False):
        (warning,) = check_against_trainer(probe_params(), cfg, scoring_observed_steps=scoring)
        assert all(f in warning for f in fragments), warning


def test_several_generations_within_one_step_are_on_policy(tmp_path):
    cfg = grpo(tmp_path, gradient_accumulation_steps=4, steps_per_generation=2)
    assert check_against_trainer(probe_params(), cfg, scoring_observed_steps=True) == []


def test_unknown_trainer_values_are_skipped(caplog):
    params = validate_params({"batch_config": {"G": 16}, "generation": {"max_new_tokens": 99, "temperature": 0.3}})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_against_trainer(params, TrainerConfig(), scoring_observed_steps=True) == []
        assert check_against_trainer(params, TrainerConfig(num_iterations=1), scoring_observed_steps=True) == []
    assert not caplog.records
