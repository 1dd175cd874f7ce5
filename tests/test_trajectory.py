"""The trajectory stage: the probe scored against a real run's own steps (tiny TRL run, a checkpoint every step)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from entropy_probe.artifacts.trajectory import Trajectory, TrajectoryMetrics
from entropy_probe.errors import ProbeError
from entropy_probe.params import validate_params
from entropy_probe.trajectory import calibration_of, population_of, step_pairs, trainer_entropy_log
from stages import demo as demo_stage
from stages import trajectory as trajectory_stage

DEMO = {
    "max_operand": 3,
    "hidden_size": 32,
    "warmup_steps": 40,  # with warmup_lr 0.003: right about half the time, so U groups have mixed rewards
    "warmup_lr": 0.003,
    "rl_steps": 3,
    "save_steps": 1,
    "prompts_per_step": 4,
    "num_generations": 2,
    "lora_rank": 2,
    "rl_lr": 0.01,
}


def _params(demo_dir: Path, **trajectory):
    return validate_params(
        {
            "checkpoint": {"dtype": "fp32", "device_map": "cpu"},
            "batch_config": {"dataset_name": str(demo_dir / "prompts.jsonl"), "G": 4},
            "generation": {"gen_batch_size": 64},
            "trajectory": {
                "run_dir": str(demo_dir / "run"),
                "B_E": 16,
                "B_U": 8,
                "trainer_B_U": 4,
                "trainer_draws": 4,
                **trajectory,
            },
        }
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A 3-step TRL run saved every step, and the trajectory stage's outputs for its two steps."""
    root = tmp_path_factory.mktemp("trajectory")
    demo_dir = root / "demo"
    demo_stage.run(validate_params({"demo": DEMO}), demo_dir, dry_run=False)
    params = _params(demo_dir)
    out = root / "out"
    text = trajectory_stage.run(params, out, dry_run=False)
    return demo_dir, params, out, text


def _load64(params, checkpoint: Path):
    from entropy_probe.checkpoint import load_policy_model, load_tokenizer, resolve_paths
    from entropy_probe.perturb import as_float64

    paths = resolve_paths(params.checkpoint.model_copy(update={"path": str(checkpoint)}))
    model = load_policy_model(params.checkpoint, paths)
    return model, as_float64(copy.deepcopy(model)), load_tokenizer(paths)


def test_outputs_and_summary(scored):
    _, _, out, text = scored
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"trajectory.json", "metrics.json", "trajectory.md", "steps.png", "cumulative.png"} <= names
    assert {"plots/steps.csv", "plots/cumulative.csv"} <= names
    traj = Trajectory.read(out)
    assert [(s.step, s.next_step) for s in traj.steps] == [(1, 2), (2, 3)]
    metrics = TrajectoryMetrics.read(out).model_dump()
    assert metrics == {k: v for k, v in traj.calibration.model_dump().items() if k in metrics} and "z_sd" in metrics
    assert text.startswith("# Scored against the trainer's own steps") and "| 1→2 |" in text
    rows = (out / "plots" / "steps.csv").read_text().splitlines()
    assert rows[0].startswith("step,delta_h_obs,forecast,lo,hi") and len(rows) == 3
    assert "| forecast δH₁ + δH₂ | first order alone |" in text and "| trainer σ |" in text


def test_exact_delta_h_is_h_next_minus_h_this(scored):
    """ΔH_obs = H(θ(k+1)) − H(θ(k)): H(θ(k) + Δθ_obs) from the perturbed float64 model equals H of checkpoint
    k+1 loaded on its own (float64 difference of float32 weights is exact), and step 2 starts where step 1 ended."""
    demo_dir, params, out, _ = scored
    traj = Trajectory.read(out)
    for s in traj.steps:
        assert s.delta_h_obs == s.entropy_next - s.entropy and s.delta_h_obs_method == "exact"
    assert traj.steps[1].entropy == traj.steps[0].entropy_next
    _, model64, tokenizer = _load64(params, demo_dir / "run" / "checkpoint-3")
    population = population_of(params, tokenizer, len(tokenizer), temperature=1.0)
    assert population.entropy(model64) == pytest.approx(traj.steps[1].entropy_next, abs=1e-12)
    assert traj.n_population_prompts == 16


def test_exact_first_order_matches_the_exact_gradient(scored):
    """δH₁_obs from central differences of exact H equals ∇H·Δθ_obs from autograd through the enumeration."""
    from entropy_probe.enumeration import directional, exact_gradients
    from entropy_probe.observed import adapter_parameter_names, observed_delta_theta
    from entropy_probe.update import FlatLayout

    demo_dir, params, out, _ = scored
    step = Trajectory.read(out).steps[0]
    model, model64, tokenizer = _load64(params, demo_dir / "run" / "checkpoint-1")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = FlatLayout.from_named(named)
    delta = observed_delta_theta(step.checkpoint, step.next_checkpoint, layout, adapter_parameter_names(model))
    population = population_of(params, tokenizer, len(tokenizer), temperature=1.0)
    kw = population.spec.kwargs()
    values, grads, _ = exact_gradients(model64, population.prompts, None, **kw)
    exact = directional(grads["token_mean"], layout.unflatten(delta))
    assert values["token_mean"] == pytest.approx(step.entropy, abs=1e-12)
    # O(h²) truncation with h = 0.01 of a step whose δH₂/δH₁ is O(1): well inside 1e-3 relative
    assert step.delta_h1_obs_exact == pytest.approx(exact, rel=1e-3)


def test_step_numbers_are_consistent(scored):
    demo_dir, params, out, _ = scored
    traj = Trajectory.read(out)
    log = {
        e["step"]: e["entropy"]
        for e in json.loads((demo_dir / "run" / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
    }
    assert (traj.B_U, traj.trainer_B_U, traj.trainer_B_U_source, traj.observed) == (
        8,
        4,
        "trajectory.trainer_B_U",
        "exact",
    )
    for s in traj.steps:
        assert s.se_U is not None, "every U draw here has groups with mixed rewards"
        assert s.forecast == pytest.approx(s.forecast_delta_h1 + s.forecast_delta_h2, rel=1e-12, abs=1e-15)
        assert s.se_delta_h_obs == 0.0 and s.sampled is None
        spread = math.sqrt(s.se_forecast**2 + s.sd_trainer**2)
        assert s.z == pytest.approx((s.delta_h_obs - s.forecast) / spread, rel=1e-12)
        spread1 = math.sqrt(s.se_forecast_first_order**2 + s.sd_trainer_first_order**2)
        assert s.z_first_order == pytest.approx((s.delta_h_obs - s.forecast_delta_h1) / spread1, rel=1e-12)
        assert s.z_delta_h1_obs == pytest.approx((s.delta_h1_obs - s.delta_h1_obs_exact) / s.se_delta_h1_obs, rel=1e-12)
        assert s.verdict in ("linear", "curved", "unresolved") and s.sd_trainer > 0
        assert -1 <= s.cos_emul_obs <= 1 and -1 <= s.cos_emul_emul <= 1 and s.norm_ratio > 0
        assert s.trainer_entropy == log[s.step + 1]  # logged at step k+1 for the batch drawn at θ(k)
        assert s.learning_rate == pytest.approx(DEMO["rl_lr"] * (1 - s.step / DEMO["rl_steps"]))
    assert traj.calibration == calibration_of(traj.steps)


def test_artifact_round_trip_and_malformed(scored, tmp_path):
    _, _, out, _ = scored
    traj = Trajectory.read(out)
    traj.write(tmp_path)
    assert Trajectory.read(tmp_path) == traj
    raw = json.loads((tmp_path / Trajectory.FILE).read_text())
    raw["steps"] = []
    (tmp_path / Trajectory.FILE).write_text(json.dumps(raw))
    with pytest.raises(ProbeError, match=r"trajectory\.json is not a valid .*steps.*rerun the trajectory stage"):
        Trajectory.read(tmp_path)


def _fake_run(root: Path, steps: list[int]) -> Path:
    run = root / "run"
    for k in steps:
        (run / f"checkpoint-{k}").mkdir(parents=True)
    return run


def test_run_dir_needs_two_consecutive_checkpoints(tmp_path):
    with pytest.raises(ProbeError, match=r"holds 1 checkpoint-N dir\(s\).*save_steps=1") as info:
        step_pairs(_fake_run(tmp_path / "a", [5]))
    assert "\n" not in str(info.value)
    with pytest.raises(ProbeError, match="no two checkpoints one step apart"):
        step_pairs(_fake_run(tmp_path / "b", [2, 4, 6]))
    run = _fake_run(tmp_path / "c", [1, 2, 3, 10])
    assert [(p.step, p.next.name) for p in step_pairs(run)] == [(1, "checkpoint-2"), (2, "checkpoint-3")]
    assert [p.step for p in step_pairs(run, [2])] == [2]
    with pytest.raises(ProbeError, match="trajectory.steps names step 3"):
        step_pairs(run, [3])


def test_cli_refuses_a_single_checkpoint_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    run = _fake_run(tmp_path, [7])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["trajectory", "-S", f"trajectory.run_dir={run}", "--out", str(out)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "entropy-probe trajectory: error:" in lines[0] and "holds 1 checkpoint" in lines[0]
    assert not out.exists()


def test_trainer_entropy_log_reads_the_latest_state(tmp_path):
    run = _fake_run(tmp_path, [1, 2])
    history = [{"step": 1, "entropy": 0.5, "loss": 0.1}, {"step": 2, "loss": 0.2}, {"step": 3, "entropy": 0.25}]
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (run / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"log_history": history[:1]}))
    assert trainer_entropy_log([run / "checkpoint-1", run / "checkpoint-2"]) == {1: 0.5, 3: 0.25}
    assert trainer_entropy_log([_fake_run(tmp_path / "x", [1]) / "checkpoint-1"]) == {}  # no trainer_state.json


def test_too_large_to_enumerate_is_refused(scored):
    demo_dir, _, _, _ = scored
    from entropy_probe.tiny import build_tokenizer

    params = validate_params(
        {"batch_config": {"dataset_name": str(demo_dir / "prompts.jsonl")}, "exact": {"max_sequences": 1000}}
    )
    with pytest.raises(ProbeError, match=r"exact ΔH_obs needs .* > exact.max_sequences = 1000.*observed: sampled"):
        population_of(params, build_tokenizer(), len(build_tokenizer()), temperature=1.0)


def test_sampled_delta_h_obs_agrees_with_the_exact_one(scored, tmp_path):
    """trajectory.observed=sampled (common random numbers + SNIS) on the same step: within 3 SE of the exact ΔH_obs,
    and the along-step terms then come from the E batch (no exact values)."""
    demo_dir, params, out, _ = scored
    exact = Trajectory.read(out).steps[0]
    sampled_params = _params(demo_dir, steps=[1], observed="sampled", B_obs=256)
    text = trajectory_stage.run(sampled_params, tmp_path / "s", dry_run=False)
    traj = Trajectory.read(tmp_path / "s")
    s = traj.steps[0]
    assert traj.observed == "sampled" and traj.B_obs == 256 and s.delta_h_obs_method == "sampled"
    assert s.entropy is None and s.delta_h1_obs_exact is None and s.z_delta_h1_obs is None
    assert s.se_delta_h_obs > 0 and s.sampled.n_sequences == 256 and 0 <= s.sampled.weight_fresh <= 1
    assert abs(s.delta_h_obs - exact.delta_h_obs) < 3 * s.se_delta_h_obs
    assert s.se_delta_h_obs < abs(exact.delta_h_obs), "the SE resolves the step"
    spread = math.sqrt(s.se_forecast**2 + s.sd_trainer**2 + s.se_delta_h_obs**2)
    assert s.z == pytest.approx((s.delta_h_obs - s.forecast) / spread, rel=1e-12)
    assert traj.calibration.along_step == "sampled" and "ΔH_obs sampled (256 rows" in text


def test_trainer_batch_from_its_settings_and_estimand_mismatch_refused(scored, tmp_path):
    """trainer_B_U auto = per_device_train_batch_size × accumulation ÷ num_generations of the demo's trainer
    (its prompts_per_step), the pool 4× that; a max_new_tokens the trainer did not use is refused in one line."""
    from entropy_probe.probe import Probe
    from entropy_probe.trajectory import setup_of

    demo_dir, _, _, _ = scored
    params = _params(demo_dir, trainer_B_U="auto", B_U="auto")
    probe = Probe.from_checkpoint(demo_dir / "run" / "checkpoint-1", params=params)
    setup = setup_of(params, probe)
    assert (setup.trainer_B_U, setup.B_U) == (DEMO["prompts_per_step"], 4 * DEMO["prompts_per_step"])
    assert "per_device_train_batch_size" in setup.trainer_B_U_source
    bad = params.model_copy(deep=True)
    bad.generation.max_new_tokens = 2
    with pytest.raises(ProbeError, match=r"max_new_tokens=2.*max_completion_length=3") as info:
        setup_of(bad, Probe.from_checkpoint(demo_dir / "run" / "checkpoint-1", params=bad))
    assert "\n" not in str(info.value)
    small = _params(demo_dir, trainer_B_U=4, B_U=4)
    with pytest.raises(ProbeError, match=r"trajectory.B_U = 4 .* not more than the trainer's 4"):
        setup_of(small, probe)
