"""verl FSDP2 actor checkpoints (fixtures written by verl's own FSDPCheckpointManager on CPU/gloo,
tests/fixtures/verl/) through the whole probe: format detection from the actor, step or run dir, θ = the joined
fp32 shards, the AdamW identity between consecutive steps, the CLI pipeline with exact enumeration, the
observed step across global_step_N dirs, the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_pipeline import observed_delta_h1, run_cli_pipeline
from safetensors.torch import load_file
from trainer_ckpt import adamw_ulps

from entropy_probe.errors import ProbeError
from entropy_probe.params import validate_params
from entropy_probe.probe import Probe

FIXTURES = Path(__file__).parent / "fixtures" / "verl"


def params_for(path: Path, **checkpoint) -> object:
    return validate_params(
        {
            "checkpoint": {"path": str(path), "dtype": "fp32", "device_map": "cpu", **checkpoint},
            "batch_config": {"dataset_name": "arithmetic:3", "B_E": 48, "B_U": 4, "G": 4},
        }
    )


@pytest.mark.parametrize("where", ["global_step_2/actor", "global_step_2", ""], ids=["actor", "step", "run root"])
@pytest.mark.parametrize("run", ["full_w1", "full_w2"])
def test_theta_and_state_are_the_live_ones(run, where):
    """From the actor dir, its global_step_N or the run root (the tracker names step 2): the loaded parameters and
    moments are the live ones gathered at save time, bit for bit; one AdamW group with the scheduler's next lr."""
    path = FIXTURES / run / where
    probe = Probe.from_checkpoint(path, params=params_for(path))
    assert probe.paths.format == "verl-fsdp" and probe.paths.checkpoint_dir.parent.name == "global_step_2"
    live = load_file(FIXTURES / run / "reference" / "global_step_2.live.safetensors")
    for name, p in probe.model.named_parameters():
        assert torch.equal(p.detach(), live[f"weight/{name}"].view_as(p)), name
        assert torch.equal(probe.optimizer.exp_avg_sq[name], live[f"exp_avg_sq/{name}"].view_as(p)), name
    (group,) = probe.optimizer.groups
    assert group["lr"] == probe.learning_rate == pytest.approx(0.0025) and group["weight_decay"] == 0.01
    assert probe.model.lm_head.weight is probe.model.model.embed_tokens.weight  # tied, as the run's model


@pytest.mark.numerics
@pytest.mark.parametrize("run", ["full_w1", "full_w2"])
def test_the_observed_step_is_adamw_from_the_next_moments(run):
    """θ(2) − θ(1), found as the next global_step_N of the run, is torch AdamW's step from step 2's moments with
    step 1's next lr and the group's decay."""
    this_dir = FIXTURES / run / "global_step_1" / "actor"
    this = Probe.from_checkpoint(this_dir, params=params_for(this_dir))
    next_dir = FIXTURES / run / "global_step_2" / "actor"
    nxt = Probe.from_checkpoint(next_dir, params=params_for(next_dir))
    observed = this.observed_step().observed
    assert (observed.record.step, observed.record.next_step) == (1, 2)
    assert observed.record.next_checkpoint == str(next_dir)
    worst = adamw_ulps(this, nxt, observed.delta_theta)
    assert worst < 4, f"observed step differs from AdamW's by {worst:.2f} ulp of θ"


@pytest.mark.parametrize("run", ["full_w2", "lora_w2"])
def test_cli_pipeline_and_exact_enumeration(tmp_path, run):
    """verify → sample-e → sample-u → delta-h1 → exact on a 2-rank verl actor (every parameter; or the LoRA
    adapter on the base its shards hold): δH₁ against exact enumeration (|z| < 3) and the FD check; the
    observed rule to global_step_2."""
    verify = run_cli_pipeline(
        tmp_path, {"path": str(FIXTURES / run / "global_step_1" / "actor")}, generation={"max_new_tokens": 3}
    )
    assert verify["checkpoint"]["format"] == "verl-fsdp" and verify["trainer_config_source"] is None
    assert observed_delta_h1(tmp_path)["update"]["observed"]["next_step"] == 2


@pytest.mark.numerics
def test_a_lora_run_is_peft_lora_on_its_base():
    """A verl LoRA run: only the adapter is trainable, its tensors and moments are the live ones, the base is the
    shards' base_layer tensors; θ(2) − θ(1) of the adapter is torch AdamW's step from step 2's moments."""
    this_dir, next_dir = (FIXTURES / "lora_w2" / f"global_step_{k}" / "actor" for k in (1, 2))
    this, nxt = (Probe.from_checkpoint(d, params=params_for(d)) for d in (this_dir, next_dir))
    live = load_file(FIXTURES / "lora_w2" / "reference" / "global_step_1.live.safetensors")
    trainable = {n: p for n, p in this.model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(this.optimizer.names) and all(".lora_" in n for n in trainable)
    for name, p in this.model.named_parameters():
        assert torch.equal(p.detach(), live[f"weight/{name}"].view_as(p)), name
    assert adamw_ulps(this, nxt, this.observed_step().observed.delta_theta) < 4  # the adapter's step


def test_refusals(tmp_path):
    """base_model on a verl checkpoint, a missing rank file: one line each."""
    full = FIXTURES / "full_w2" / "global_step_2" / "actor"
    with pytest.raises(ProbeError, match="checkpoint.base_model is set, but .* is a verl checkpoint"):
        params = params_for(full, base_model="somewhere")
        Probe.from_checkpoint(params.checkpoint.path, params=params)
    copy = shutil.copytree(full, tmp_path / "global_step_2" / "actor")
    (copy / "optim_world_size_2_rank_1.pt").unlink()
    with pytest.raises(ProbeError, match="lacks optim_world_size_2_rank_1.pt"):
        Probe.from_checkpoint(copy, params=params_for(copy))
