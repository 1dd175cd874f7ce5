"""DeepSpeed ZeRO checkpoints of the HF Trainer (fixtures made by the real DeepSpeed, tests/fixtures/deepspeed/)
through the whole probe: format detection, θ = the fp32 masters, the AdamW identity between consecutive
checkpoints, the CLI pipeline with exact enumeration, the observed step, the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_pipeline import observed_delta_h1, run_cli_pipeline
from safetensors.torch import load_file
from trainer_ckpt import adamw_ulps

from entropy_probe.errors import ProbeError
from entropy_probe.params import validate_params
from entropy_probe.probe import Probe

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"


def params_for(run: str, step: int = 2, **checkpoint) -> object:
    return validate_params(
        {
            "checkpoint": {
                "path": str(FIXTURES / run / f"checkpoint-{step}"),
                "dtype": "fp32",
                "device_map": "cpu",
                "trust_pickles": True,  # our fixture's training_args.bin (the run's settings); not DeepSpeed's files
                **checkpoint,
            },
            "batch_config": {"dataset_name": "arithmetic:3", "B_E": 48, "B_U": 4, "G": 4},
        }
    )


@pytest.mark.parametrize("run", ["zero2_w2", "zero3_w2", "zero1_w3", "zero3_w3_tied"])
def test_theta_is_the_fp32_master_and_the_state_is_named(run):
    """The loaded policy's parameters are ds_to_universal's fp32 masters bit for bit (ZeRO-3 saves no
    model.safetensors at all), the groups are DeepSpeed's, every parameter has its moments."""
    params = params_for(run)
    probe = Probe.from_checkpoint(params.checkpoint.path, params=params)
    assert probe.paths.format == "deepspeed-zero" and probe.paths.optimizer_path.name == "global_step2"
    universal = load_file(FIXTURES / run / "reference" / "checkpoint-2.universal.safetensors")
    for name, p in probe.model.named_parameters():
        assert torch.equal(p.detach(), universal[f"fp32/{name}"].view_as(p)), name
        assert torch.equal(probe.optimizer.exp_avg[name], universal[f"exp_avg/{name}"].view_as(p)), name
    assert set(probe.optimizer.names) == {n for n, _ in probe.model.named_parameters()}
    assert [g["weight_decay"] for g in probe.optimizer.groups] == [0.1, 0.0]


@pytest.mark.numerics
@pytest.mark.parametrize("run", ["zero2_w2", "zero3_w2"])
def test_the_observed_step_is_adamw_from_the_next_moments(run):
    """θ(2) − θ(1) of the masters is torch AdamW's step from checkpoint-2's moments with checkpoint-1's stored
    lr and each group's decay — the mapping of the flat partitions to names, checked through the optimizer."""
    this = Probe.from_checkpoint(FIXTURES / run / "checkpoint-1", params=params_for(run, 1))
    nxt = Probe.from_checkpoint(FIXTURES / run / "checkpoint-2", params=params_for(run, 2))
    observed = this.observed_step().observed
    assert (observed.record.step, observed.record.next_step) == (1, 2)
    worst = adamw_ulps(this, nxt, observed.delta_theta)
    assert worst < 4, f"observed step differs from AdamW's by {worst:.2f} ulp of θ"


def test_cli_pipeline_and_exact_enumeration_on_zero3(tmp_path):
    """verify → sample-e → sample-u → delta-h1 → exact on a ZeRO-3 checkpoint of 2 ranks (no model.safetensors):
    δH₁ over every parameter against exact enumeration (|z| < 3) and the FD check; the observed rule too."""
    checkpoint = {"path": str(FIXTURES / "zero3_w2" / "checkpoint-1"), "trust_pickles": True}
    verify = run_cli_pipeline(tmp_path, checkpoint, generation={"max_new_tokens": 3})
    assert verify["checkpoint"]["format"] == "deepspeed-zero" and verify["adapter"] is None
    assert verify["optimizer_mapping"] == "DeepSpeed ZeRO partitions (global_step1)"
    assert observed_delta_h1(tmp_path)["update"]["observed"]["next_step"] == 2


def test_detected_before_the_model_file_and_refusals(tmp_path):
    """A ZeRO-2 checkpoint also holds model.safetensors (the weights in the training dtype): the DeepSpeed tag
    wins; forcing full-model reads that file instead. base_model on it is refused; so is a missing rank."""
    zero2 = FIXTURES / "zero2_w2" / "checkpoint-2"
    assert (zero2 / "model.safetensors").is_file()
    assert Probe.from_checkpoint(zero2, params=params_for("zero2_w2")).paths.format == "deepspeed-zero"
    with pytest.raises(ProbeError, match="checkpoint.base_model is set, but .* is a DeepSpeed ZeRO checkpoint"):
        params = params_for("zero2_w2", base_model="somewhere")
        Probe.from_checkpoint(params.checkpoint.path, params=params)
    import shutil

    copy = shutil.copytree(FIXTURES / "zero3_w2" / "checkpoint-2", tmp_path / "checkpoint-2")
    next(copy.glob("global_step2/*rank_1*optim_states.pt")).unlink()
    with pytest.raises(ProbeError, match="lacks the optimizer-state file of rank 1"):
        Probe.from_checkpoint(copy, params=params_for("zero3_w2"))
