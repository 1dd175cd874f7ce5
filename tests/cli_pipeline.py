"""The CLI pipeline every checkpoint-format test runs: verify → sample-e → sample-u → delta-h1 → exact on one
checkpoint of the tiny arithmetic task, δH₁ checked against exact enumeration and the finite difference, and the
observed rule to the next checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from stages.cli import app


def run_cli_pipeline(tmp_path: Path, checkpoint: dict, dataset: str = "arithmetic:3", **sections) -> dict:
    """Run the five stages with `checkpoint` (params keys; fp32 on CPU unless given) on B_E 48, B_U 4 × 4 and a
    finer FD step (a full Adam step curves), check δH₁ against enumeration (|z_population| < 3), the FD slope
    (rel. err < 1e-4) and that exact covered every trainable parameter; returns verify.json."""
    raw = {
        "paths": {k: str(tmp_path / k) for k in ("verify", "sample_e", "sample_u", "delta_h1", "exact")},
        "checkpoint": {"dtype": "fp32", "device_map": "cpu", **checkpoint},
        "batch_config": {"dataset_name": dataset, "B_E": 48, "B_U": 4, "G": 4},
        "exact": {"eta_multipliers": [1.0], "fd_eps": 1e-4},
        **sections,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for stage in ("verify", "sample-e", "sample-u", "delta-h1", "exact"):
        result = CliRunner().invoke(app, [stage, "--params", str(tmp_path / "params.yaml")])
        assert result.exit_code == 0, (stage, result.output)
    verify = json.loads((tmp_path / "verify" / "verify.json").read_text())
    exact = json.loads((tmp_path / "exact" / "exact.json").read_text())
    target = exact["targets"][exact["configured_target"]]
    assert exact["n_parameters"] == verify["n_trainable"] and target["rel_err_fd"] < 1e-4
    assert abs(target["z_population"]) < 3, target
    return verify


def observed_delta_h1(tmp_path: Path) -> dict:
    """delta-h1 with update.rule=observed on run_cli_pipeline's params (the step to the next checkpoint): its report."""
    out = tmp_path / "observed"
    args = ["delta-h1", "--params", str(tmp_path / "params.yaml"), "-S", "update.rule=observed", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "delta_h1.json").read_text())
