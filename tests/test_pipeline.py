"""The CLI end to end on a tiny Trainer-layout checkpoint: verify → sample-e → sample-u → delta-h1 → exact,
for LoRA and QLoRA; artifact round-trips; bad input gives one line, exit 2 and nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from tolerances import assert_close_scaled, dot_scale
from typer.testing import CliRunner

from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.files import read_tensors
from stages.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, trainer_checkpoint):
    root = tmp_path_factory.mktemp("pipeline")
    ckpt = trainer_checkpoint(steps=2, total_steps=4, hidden_size=32)  # shared: read only
    params = {
        "paths": {k: str(root / k) for k in ("verify", "sample_e", "sample_u", "delta_h1", "exact", "truth", "report")},
        "checkpoint": {"path": str(ckpt), "dtype": "fp32", "device_map": "cpu", "trust_pickles": True},
        "batch_config": {"dataset_name": "arithmetic:3", "B_E": 24, "B_U": 4, "G": 4},
        "generation": {"max_new_tokens": 3, "top_p": 1.0},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("sample-e", "sample-u"):  # drawn once (by the LoRA policy), probed under both loadings
        result = cli(root, stage)
        assert result.exit_code == 0, result.output
    return root


def cli(root, *args: str):
    return runner.invoke(app, [*args[:1], "--params", str(root / "params.yaml"), *args[1:]])


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_whole_pipeline(workdir, qlora):
    flag = ["-S", f"checkpoint.use_qlora={str(qlora).lower()}"]
    out = {name: workdir / f"{name}_{qlora}" for name in ("verify", "delta_h1", "exact")}
    assert cli(workdir, "verify", *flag, "--out", str(out["verify"])).exit_code == 0
    result = cli(workdir, "delta-h1", *flag, "-S", f"paths.verify={out['verify']}", "--out", str(out["delta_h1"]))
    assert result.exit_code == 0, result.output
    report = json.loads((out["delta_h1"] / "delta_h1.json").read_text())
    for key in (
        "delta_h1",
        "bars_dot",
        "learning_rate",
        "entropy",
        "se_delta_h1",
        "se_E",
        "se_U",
        "B_E",
        "B_U",
        "n_E_tokens",
        "n_U_tokens",
        "norm_xbar",
        "norm_delta_theta",
    ):
        assert key in report, key
    assert "timings" not in report  # later stages depend on this file: a re-run must not change it
    assert report["B_E"] == 24 and report["B_U"] == 4 and report["se_delta_h1"] > 0
    assert report["update"]["loss_agg_mode"] == "seq-mean-token-mean"  # the trainer's loss_type "grpo"
    bars, meta = read_tensors(out["delta_h1"] / "bars.safetensors", "bars")
    names = [p["name"] for p in json.loads((out["verify"] / "verify.json").read_text())["parameters"]]
    assert sorted(bars) == sorted([f"xbar.{n}" for n in names] + [f"delta_theta.{n}" for n in names])
    dot = sum(float((bars[f"xbar.{n}"].double() * bars[f"delta_theta.{n}"].double()).sum()) for n in names)
    scale = sum(dot_scale(bars[f"xbar.{n}"], bars[f"delta_theta.{n}"]) for n in names)
    assert_close_scaled(dot, report["delta_h1"], scale, what="bars round-trip to the reported δH₁")
    lines = (out["delta_h1"] / "attributions.csv").read_text().splitlines()
    assert lines[0].startswith("batch,index") and len(lines) == 1 + 4 + 24
    if not qlora:  # exact enumeration runs in float64, which the 4-bit base does not support
        result = cli(
            workdir,
            "exact",
            "-S",
            f"paths.verify={out['verify']}",
            "-S",
            f"paths.delta_h1={out['delta_h1']}",
            "--out",
            str(out["exact"]),
        )
        assert result.exit_code == 0, result.output
        exact = json.loads((out["exact"] / "exact.json").read_text())
        configured = exact["configured_target"]
        assert abs(exact["targets"][configured]["z"]) < 4
        # delta-h1 estimated the configured target only (compute.all_targets false): the others are exact only
        others = [t for t in exact["targets"] if t != configured]
        assert len(others) == 2 and all(exact["targets"][t]["z"] is None for t in others)


def test_dry_run_prints_the_plan_and_writes_nothing(workdir):
    for stage in ("verify", "sample-e", "sample-u"):
        result = cli(workdir, stage, "--dry-run", "--out", str(workdir / f"dry_{stage}"))
        assert result.exit_code == 0, result.output
        assert not (workdir / f"dry_{stage}").exists()
    result = cli(workdir, "sample-u", "--dry-run")
    assert "4 prompts without replacement" in result.output and "16 sequences" in result.output


@pytest.mark.parametrize(
    "override, message",
    [
        ("estimator.entropy=banana", "estimator.entropy"),
        ("estimator.baseline_typo=1", "unknown params key 'estimator.baseline_typo'"),
        ("batch_config.B_U=1000", "batch_config.B_U"),
        ("checkpoint.path=/nonexistent/ckpt", "/nonexistent/ckpt"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, override, message):
    stage = "sample-u" if "B_U" in override else "verify"
    out = workdir / f"bad_{abs(hash(override))}"
    result = cli(workdir, stage, "-S", override, "--out", str(out))
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.output
    assert not out.exists()


def test_foreign_and_truncated_artifacts_are_refused(workdir, tmp_path):
    """delta-h1 given another stage's tensors, or a cut-off file, in place of the E samples: a clear error."""
    import torch

    from entropy_probe.files import write_tensors

    write_tensors(tmp_path / "foreign" / "samples.safetensors", {"x": torch.zeros(2)}, kind="optimizer_state")
    good = (workdir / "sample_e" / "samples.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "samples.safetensors").write_bytes(good[: len(good) // 2])
    (tmp_path / "cut" / "samples.json").write_text((workdir / "sample_e" / "samples.json").read_text())
    for bad, message in (("foreign", "expected 'samples_e'"), ("cut", "not a readable safetensors file")):
        result = cli(workdir, "delta-h1", "-S", f"paths.sample_e={tmp_path / bad}", "--out", str(tmp_path / "x"))
        errors = [line for line in result.output.splitlines() if "error:" in line]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert not (tmp_path / "x").exists()


def test_all_equal_rewards_are_refused_without_momentum(workdir, tmp_path):
    """A U batch whose every group has equal rewards has no policy gradient: for sgd (Δθ = 0) one line, exit 2,
    nothing written; for adam_step the forecast is AdamW's momentum/decay step, which the trainer still takes."""
    import shutil

    from entropy_probe.files import write_tensors

    tensors, meta = read_tensors(workdir / "sample_u" / "samples.safetensors", "samples_u")
    tensors["rewards"] = tensors["rewards"].zero_()
    tensors["advantages"] = tensors["advantages"].zero_()
    write_tensors(tmp_path / "u" / "samples.safetensors", tensors, kind="samples_u", meta=meta)
    shutil.copy(workdir / "sample_u" / "samples.json", tmp_path / "u" / "samples.json")
    assert cli(workdir, "verify", "--out", str(tmp_path / "v")).exit_code == 0
    result = cli(
        workdir,
        "delta-h1",
        "-S",
        f"paths.sample_u={tmp_path / 'u'}",
        "-S",
        f"paths.verify={tmp_path / 'v'}",
        "-S",
        "update.rule=sgd",
        "--out",
        str(tmp_path / "x"),
    )
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert result.exit_code == 2 and len(errors) == 1 and "all-equal rewards" in errors[0], result.output
    assert not (tmp_path / "x").exists()
    args = ["delta-h1", "-S", f"paths.sample_u={tmp_path / 'u'}", "-S", f"paths.verify={tmp_path / 'v'}"]
    assert cli(workdir, *args, "--out", str(tmp_path / "m")).exit_code == 0
    report = DeltaH1Report.read(tmp_path / "m")
    assert report.delta_h1_gradient_part == 0.0 and report.delta_h1 == report.delta_h1_momentum_part != 0.0
    assert report.se_U is None and "fewer than 2 prompt groups" in report.se_U_note
