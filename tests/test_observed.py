"""Observed steps: Δθ_obs = θ(next checkpoint) − θ(this) from the adapter files of one Trainer run.

Ground truth: two checkpoints of one real (tiny) training run (tests/trainer_ckpt.py; the same seed makes the
second run the continuation of the first, so checkpoint-3 is checkpoint-2 plus one trainer step), and the
live parameters of the trained models, named as the loaded PeftModel names them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tolerances import FP64_REL, assert_close_scaled, dot_scale
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from trainer_ckpt import write_trainer_checkpoint  # noqa: E402

from entropy_probe.artifacts.delta_h1 import ATTRIBUTIONS_FILE, Bars, DeltaH1Report  # noqa: E402
from entropy_probe.checkpoint import checkpoint_fingerprint, load_policy_model, resolve_paths  # noqa: E402
from entropy_probe.errors import ProbeError  # noqa: E402
from entropy_probe.observed import adapter_parameter_names, next_checkpoint, observed_delta_theta  # noqa: E402
from entropy_probe.params import CheckpointParams  # noqa: E402
from entropy_probe.update import FlatLayout  # noqa: E402
from stages.cli import app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")
WEIGHTS = "adapter_model.safetensors"


def ck_params(path) -> CheckpointParams:
    return CheckpointParams(path=str(path), dtype="fp32", device_map="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """checkpoint-2 and checkpoint-3 of one run (6 linear-schedule steps, LoRA-B biases: a no-decay group)."""
    root = tmp_path_factory.mktemp("observed")
    two = write_trainer_checkpoint(root, steps=2, total_steps=6, hidden_size=32)
    three = write_trainer_checkpoint(root, steps=3, total_steps=6, hidden_size=32, base_dir=two.base_dir)
    return two, three


@pytest.fixture(scope="module")
def loaded(run):
    """The PeftModel loaded from checkpoint-2, and a layout of its trainable parameters in a non-trivial order
    (reversed: the result must follow the layout, not the file's or the model's order)."""
    two, _ = run
    model = load_policy_model(ck_params(two.dir), resolve_paths(ck_params(two.dir)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, FlatLayout.from_named(trainable, list(trainable)[::-1])


def live_delta(run) -> dict[str, torch.Tensor]:
    two, three = run
    after = dict(three.model.named_parameters())
    return {n: (after[n].double() - p.double()).detach() for n, p in two.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- Δθ_obs


def test_observed_step_is_the_live_parameter_difference_by_name(run, loaded):
    two, three = run
    model, layout = loaded
    delta = observed_delta_theta(two.dir, three.dir, layout, adapter_parameter_names(model))
    assert delta.dtype == torch.float64 and delta.shape == (layout.numel,)
    expected = live_delta(run)
    assert sorted(expected) == sorted(layout.names)  # every trainable parameter, A, B and the B biases
    got = layout.unflatten(delta)
    for name in layout.names:
        assert torch.equal(got[name], expected[name]), name  # exact: a difference of float32 values in float64
    assert all(got[n].abs().sum() > 0 for n in layout.names)  # the step moved every tensor (not a vacuous 0)


def test_theta_plus_observed_step_is_the_next_checkpoint(run, loaded):
    """θ(this) + Δθ_obs, put into the model by parameter name, is bit for bit the model loaded from next."""
    two, three = run
    model, layout = loaded
    delta = layout.unflatten(observed_delta_theta(two.dir, three.dir, layout, adapter_parameter_names(model)))
    moved = {n: (p.detach().double() + delta[n]).float() for n, p in model.named_parameters() if n in delta}
    nxt = dict(load_policy_model(ck_params(three.dir), resolve_paths(ck_params(three.dir))).named_parameters())
    for name, value in moved.items():
        assert torch.equal(value, nxt[name].detach()), name


def test_first_order_along_the_observed_step_is_the_directional_derivative(run, loaded):
    """X̄·Δθ_obs with X̄ = ∇f (autograd, float64) equals the central difference of f along Δθ_obs, f = the mean
    next-token entropy of a fixed batch: the flat order and the names reach the right parameters."""
    from entropy_probe.perturb import as_float64, perturbed

    two, three = run
    model, layout = loaded
    delta = observed_delta_theta(two.dir, three.dir, layout, adapter_parameter_names(model))
    m64 = as_float64(model)
    params = dict(m64.named_parameters())
    ids = torch.randint(0, 14, (3, 6), generator=torch.Generator().manual_seed(5))

    def f() -> torch.Tensor:
        logp = torch.log_softmax(m64(input_ids=ids).logits, -1)
        return -(logp.exp() * logp).sum(-1).mean()

    grads = torch.autograd.grad(f(), [params[n] for n in layout.names])
    xbar = torch.cat([g.reshape(-1) for g in grads])
    first_order = float(xbar @ delta)
    h = 1e-3
    shift = layout.unflatten(delta)
    with torch.no_grad():
        with perturbed(m64, shift, h):
            up = float(f())
        with perturbed(m64, shift, -h):
            down = float(f())
    # central difference: error O(h²·third derivative) ≪ the terms; the dot itself is float64
    assert_close_scaled(first_order, (up - down) / (2 * h), dot_scale(xbar, delta), rel=1e-5, what="X̄·Δθ_obs vs FD")
    assert abs(first_order) > 1e-3 * dot_scale(xbar, delta)  # not a cancelling 0


# ---------------------------------------------------------------------------------------------- next checkpoint


def test_next_checkpoint_is_the_smallest_larger_step(tmp_path):
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-10", "checkpoint-3-old", "last"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-4").write_text("a file, not a checkpoint")
    assert next_checkpoint(tmp_path / "checkpoint-2") == tmp_path / "checkpoint-3"  # numeric, not string order
    assert next_checkpoint(tmp_path / "checkpoint-3") == tmp_path / "checkpoint-10"
    assert next_checkpoint(tmp_path / "checkpoint-1") == tmp_path / "checkpoint-2"
    with pytest.raises(ProbeError, match=r"no checkpoint after checkpoint-10 in .* — keep the next checkpoint"):
        next_checkpoint(tmp_path / "checkpoint-10")
    with pytest.raises(ProbeError, match="last is not named checkpoint-N.* — set update.next_checkpoint"):
        next_checkpoint(tmp_path / "last")
    with pytest.raises(ProbeError, match="checkpoint .*checkpoint-7 not found"):
        next_checkpoint(tmp_path / "checkpoint-7")


# ---------------------------------------------------------------------------------------------- refusals


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(ckpt: Path, edit) -> None:
    tensors = load_file(str(ckpt / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(ckpt / WEIGHTS))


def _first_lora_a(tensors: dict) -> str:
    return sorted(k for k in tensors if "lora_A" in k)[0]


def _grow(tensors):
    key = _first_lora_a(tensors)
    tensors[key] = torch.cat([tensors[key], tensors[key][:1]])  # one more rank row


def _drop(tensors):
    del tensors[_first_lora_a(tensors)]


def _nan(tensors):
    tensors[_first_lora_a(tensors)][0, 0] = float("nan")


def _delete_weights(ckpt):
    (ckpt / WEIGHTS).unlink()


def _truncate_weights(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])


CASES = {
    "rank": (lambda c: _edit_config(c, r=3), r"differ in adapter_config.json 'r' \(2 vs 3\)"),
    "alpha": (lambda c: _edit_config(c, lora_alpha=99), r"'lora_alpha' \(4 vs 99\)"),
    "targets": (lambda c: _edit_config(c, target_modules=["q_proj"]), "'target_modules'"),
    "base": (lambda c: _edit_config(c, base_model_name_or_path="other/base"), "'base_model_name_or_path'"),
    "shape": (
        lambda c: _edit_tensors(c, _grow),
        "lora_A.default.weight of .* has shape \\(3, 32\\), the parameter \\(2, 32\\)",
    ),
    "missing key": (lambda c: _edit_tensors(c, _drop), "lora_A.weight of .* is missing in .*next"),
    "non-finite": (
        lambda c: _edit_tensors(c, _nan),
        "lora_A.default.weight of .*next is torch.float32 with non-finite",
    ),
    "no weights": (_delete_weights, "no adapter_model.safetensors in .*next — "),
    "unreadable": (_truncate_weights, "adapter weights .*next/adapter_model.safetensors are unreadable"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_different_or_damaged_next_adapter_is_refused_in_one_line(run, loaded, tmp_path, case):
    two, three = run
    model, layout = loaded
    damage, pattern = CASES[case]
    nxt = _copy(three.dir, tmp_path / "next")
    damage(nxt)
    with pytest.raises(ProbeError, match=pattern) as info:
        observed_delta_theta(two.dir, nxt, layout, adapter_parameter_names(model))
    assert "\n" not in str(info.value) and " — " in str(info.value)


def test_the_undamaged_copy_is_accepted(run, loaded, tmp_path):
    """The refusals above come from the damage, not from copying the checkpoint."""
    two, three = run
    model, layout = loaded
    nxt = _copy(three.dir, tmp_path / "next")
    delta = observed_delta_theta(two.dir, nxt, layout, adapter_parameter_names(model))
    assert delta.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- the stage


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def stage_root(run, tmp_path_factory):
    """verify and sample-e for checkpoint-2 (no sample-u ever runs); returns (root, params file)."""
    two, _ = run
    root = tmp_path_factory.mktemp("stage")
    tree = {
        "paths": {k: str(root / k) for k in ("verify", "sample_e", "sample_u", "delta_h1")},
        "checkpoint": {"path": str(two.dir), "dtype": "fp32", "device_map": "cpu", "trust_pickles": True},
        "batch_config": {"dataset_name": "arithmetic:3", "B_E": 12},
        "generation": {"max_new_tokens": 3},
    }
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    for stage in ("verify", "sample-e"):
        result = cli(stage, "--params", str(params))
        assert result.exit_code == 0, result.output
    return root, params


def test_observed_stage_writes_a_valid_report_without_any_u_batch(run, stage_root):
    two, three = run
    root, params = stage_root
    result = cli("delta-h1", "--params", str(params), "-S", "update.rule=observed")
    assert result.exit_code == 0, result.output
    assert not (root / "sample_u").exists()
    out = root / "delta_h1"
    report = DeltaH1Report.read(out)
    assert report.update.rule == "observed" and report.observed
    record = report.update.observed
    assert Path(record.next_checkpoint) == three.dir and (record.step, record.next_step) == (2, 3)
    assert record.next_checkpoint_fingerprint == checkpoint_fingerprint(resolve_paths(ck_params(three.dir)))
    for key in ("se_U", "delta_h1_gradient_part", "delta_h1_momentum_part", "cov_logp_advantage", "norm_g", "B_U"):
        assert getattr(report, key) is None, key
    assert report.se_delta_h1 == report.se_E > 0
    assert report.reuse.ess_fraction_U is None and list(report.reuse.sampler_fingerprint) == ["E"]

    bars = Bars.read(out)
    expected = live_delta(run)
    for name, d in bars.delta_theta.items():  # bars keep Δθ as float32
        assert torch.equal(d, expected[name].float()), name
    delta = torch.cat([expected[n].reshape(-1) for n in bars.delta_theta])
    assert record.norm_delta_theta_obs == pytest.approx(float(delta.norm()), rel=FP64_REL)
    dot = sum(float((bars.xbar[n].double() * bars.delta_theta[n].double()).sum()) for n in bars.xbar)
    scale = sum(dot_scale(bars.xbar[n], bars.delta_theta[n]) for n in bars.xbar)
    assert_close_scaled(dot, report.delta_h1, scale, what="X̄·Δθ_obs from the bars vs δH₁_obs")
    assert report.bars_dot == pytest.approx(report.delta_h1 / report.learning_rate, rel=FP64_REL)
    assert report.learning_rate == pytest.approx(two.lr_next, rel=1e-6)  # the lr the trainer used for this step

    # δH₂ along the observed step, from the same E samples: its δH₁ is this one (float32 passes; SE-scaled bound)
    assert report.second_order is not None and report.second_order.verdict in ("linear", "curved", "unresolved")
    assert abs(report.second_order.delta_h1 - report.delta_h1) < 1e-2 * report.se_E

    lines = (out / ATTRIBUTIONS_FILE).read_text().splitlines()
    assert len(lines) == 1 + 12 and all(line.startswith("E,") for line in lines[1:])  # E rows only
    assert "observed step" in result.output and "δH₁_obs" in result.output


def test_observed_stage_dry_run_needs_no_u_batch(stage_root, run):
    root, params = stage_root
    out = root / "dry"
    result = cli("delta-h1", "--params", str(params), "-S", "update.rule=observed", "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "no U batch" in result.output and "checkpoint-3" in result.output and not out.exists()


def test_observed_stage_refuses_a_missing_next_checkpoint(stage_root, tmp_path):
    root, params = stage_root
    out = tmp_path / "out"
    missing = tmp_path / "checkpoint-9"
    result = cli(
        "delta-h1",
        "--params",
        str(params),
        "-S",
        "update.rule=observed",
        "-S",
        f"update.next_checkpoint={missing}",
        "--out",
        str(out),
    )
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert f"next checkpoint {missing}" in errors[0] and "not found" in errors[0]
    assert not out.exists()


def test_observed_stage_refuses_an_out_overlapping_the_next_checkpoint(stage_root, run):
    """The next checkpoint is an input in observed mode: --out inside the run dir that holds it is refused
    before any work, and the checkpoint is untouched."""
    _, three = run
    _, params = stage_root
    before = sorted(p.name for p in three.dir.iterdir())
    result = cli("delta-h1", "--params", str(params), "-S", "update.rule=observed", "--out", str(three.dir / "o"))
    assert result.exit_code == 2 and "update.next_checkpoint" in result.output, result.output
    assert sorted(p.name for p in three.dir.iterdir()) == before
