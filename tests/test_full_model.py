"""Full-parameter checkpoints (no adapter) written by TRL's GRPOTrainer: read, mapped, probed and checked exactly.

The fixture is a real TRL full fine-tuning run (the demo stage with demo.finetune full), every step saved. The
AdamW identity ties two consecutive checkpoints together: θ(k+1) − θ(k) is torch AdamW's step from checkpoint
k+1's moments with checkpoint k's stored (next-step) lr, so a name mapped to another parameter's moments, a
wrong group (weight decay) or a wrong lr fails it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from cli_pipeline import observed_delta_h1, run_cli_pipeline
from safetensors.torch import load_file, save_file
from tolerances import FP32_EPS
from trainer_ckpt import adamw_ulps

from entropy_probe.errors import ProbeError
from entropy_probe.params import validate_params
from entropy_probe.probe import Probe
from entropy_probe.tiny import one_thread


def params_for(run: Path, step: int, **sections) -> object:
    raw = {
        "checkpoint": {"path": str(run / "run" / f"checkpoint-{step}"), "dtype": "fp32", "device_map": "cpu"},
        "batch_config": {"dataset_name": str(run / "prompts.jsonl"), "B_E": 24, "B_U": 4, "G": 4},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_params(raw)


def test_the_trainer_groups_and_tied_weights(full_run):
    """Every parameter is trainable, the tied head is the embedding (one name, one state), and the Trainer's
    groups are every 2-D weight (embedding included) with decay, then norms and biases without."""
    probe = Probe.from_checkpoint(full_run / "run" / "checkpoint-2", params=params_for(full_run, 2))
    names = [n for n, _ in probe.model.named_parameters()]
    assert (
        probe.paths.format == "full-model" and probe.optimizer.names != [] and set(probe.optimizer.names) == set(names)
    )
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert probe.model.lm_head.weight is probe.model.model.embed_tokens.weight
    assert "lm_head.weight" not in load_file(full_run / "run" / "checkpoint-2" / "model.safetensors")
    shapes = dict(probe.model.named_parameters())
    decay, no_decay = (g["names"] for g in probe.optimizer.groups)
    assert all(shapes[n].dim() == 2 for n in decay) and "model.embed_tokens.weight" in decay
    assert all(n.endswith(("norm.weight", ".bias")) for n in no_decay) and no_decay
    assert probe.optimizer.groups[0]["weight_decay"] > 0 and probe.optimizer.groups[1]["weight_decay"] == 0
    assert probe.optimizer.mapping == "Trainer groups (decay, no-decay)"


@pytest.mark.numerics
def test_the_observed_step_is_adamw_from_the_next_moments(full_run):
    """θ(3) − θ(2) read by the observed rule equals torch AdamW's step built from checkpoint-3's moments, checkpoint-2's
    stored lr (the next step's) and each group's weight decay — to the float32 rounding of θ."""
    this = Probe.from_checkpoint(full_run / "run" / "checkpoint-2", params=params_for(full_run, 2))
    nxt = Probe.from_checkpoint(full_run / "run" / "checkpoint-3", params=params_for(full_run, 3))
    observed = this.observed_step().observed
    assert observed.record.step == 2 and observed.record.next_step == 3
    assert all(nxt.optimizer.step[n] == this.optimizer.step[n] + 1 for n in this.optimizer.names)
    worst = adamw_ulps(this, nxt, observed.delta_theta)  # θ is float32: a few ulps of |θ| from the in-place update
    assert worst < 4, f"observed step differs from AdamW's by {worst:.2f} ulp of θ"
    files = [load_file(full_run / "run" / f"checkpoint-{k}" / "model.safetensors") for k in (2, 3)]
    direct = torch.cat([(files[1][n].double() - files[0][n].double()).reshape(-1) for n in this.layout.names])
    assert torch.equal(observed.delta_theta, direct)


def test_cli_pipeline_and_exact_enumeration(full_run, tmp_path):
    """verify → sample-e → sample-u → delta-h1 → exact on a full-parameter checkpoint, X̄ and Δθ over every
    parameter; δH₁ against exact enumeration over the prompt population (|z| < 3), the FD slope check, and the
    observed rule along θ(3) − θ(2)."""
    checkpoint = {"path": str(full_run / "run" / "checkpoint-2")}
    verify = run_cli_pipeline(tmp_path, checkpoint, dataset=str(full_run / "prompts.jsonl"))
    assert verify["checkpoint"]["format"] == "full-model" and verify["adapter"] is None
    assert verify["n_trainable"] == sum(p["numel"] for p in verify["parameters"])
    assert any("every parameter is trainable" in c for c in verify["checks"])
    assert observed_delta_h1(tmp_path)["update"]["observed"]["next_step"] == 3


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_sharded_weights_and_a_saved_tied_head_read_the_same(full_run, tmp_path):
    """The same checkpoints saved as shards + index, and with lm_head.weight written beside the embedding (as
    some writers do): the same θ, the same fingerprintable files, the same observed step."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    for k in (2, 3):
        dest = copy_checkpoint(full_run / "run" / f"checkpoint-{k}", run / f"checkpoint-{k}")
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
        (dest / "model.safetensors").unlink()
        model.save_pretrained(dest, max_shard_size="40KB")
    assert len(list((run / "checkpoint-2").glob("model-*.safetensors"))) > 1
    sharded = Probe.from_checkpoint(run / "checkpoint-2", params=params_for(full_run, 2))
    single = Probe.from_checkpoint(full_run / "run" / "checkpoint-2", params=params_for(full_run, 2))
    for (n, a), (_, b) in zip(sharded.model.named_parameters(), single.model.named_parameters()):
        assert torch.equal(a, b), n
    assert torch.equal(sharded.observed_step().observed.delta_theta, single.observed_step().observed.delta_theta)

    tied = tmp_path / "tied" / "run"
    for k in (2, 3):
        dest = copy_checkpoint(full_run / "run" / f"checkpoint-{k}", tied / f"checkpoint-{k}")
        weights = load_file(dest / "model.safetensors")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    probe = Probe.from_checkpoint(tied / "checkpoint-2", params=params_for(full_run, 2))
    assert torch.equal(probe.observed_step().observed.delta_theta, single.observed_step().observed.delta_theta)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"base_model": "somewhere"},
            r"checkpoint.base_model is set \(somewhere\), but .* is a full-parameter checkpoint",
        ),
        ({"use_qlora": True}, r"checkpoint.use_qlora is true, but .* is a full-parameter checkpoint"),
        ({"format": "peft-adapter"}, r"no adapter_config.json in"),
    ],
)
def test_settings_that_do_not_fit_a_full_model_are_refused(full_run, change, message):
    params = params_for(full_run, 2, checkpoint=change)
    with pytest.raises(ProbeError, match=message):
        Probe.from_checkpoint(params.checkpoint.path, params=params)


def test_a_parameter_without_adam_state_and_an_unknown_layout_are_refused(full_run, tmp_path):
    ckpt = copy_checkpoint(full_run / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    dropped = saved["param_groups"][1]["params"][0]  # the first no-decay parameter: q_proj's bias
    del saved["state"][dropped]
    torch.save(saved, ckpt / "optimizer.pt")
    with pytest.raises(ProbeError, match=r"trainable parameter model.layers.0.self_attn.q_proj.bias has no optimizer"):
        Probe.from_checkpoint(ckpt, params=params_for(full_run, 2))

    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ProbeError, match="is neither a PEFT adapter .* nor a full model"):
        Probe.from_checkpoint(ckpt, params=params_for(full_run, 2))


def test_a_full_model_probe_in_memory_matches_the_files(full_run):
    """The callback's path: a Probe over the live model and optimizer of a full fine-tuning run gives the δH₁ the
    checkpoint gives, on the same samples."""
    from entropy_probe.optimizer_state import build_adamw, optimizer_state_of

    params = params_for(full_run, 2)
    from_files = Probe.from_checkpoint(params.checkpoint.path, params=params)
    optimizer = build_adamw(from_files.model, from_files.optimizer)
    live = Probe(
        from_files.model,
        from_files.tokenizer,
        optimizer_state_of(from_files.model, optimizer),
        from_files.trainer,
        params,
    )
    with one_thread():
        E, U = from_files.sample_e(n=8), from_files.sample_u(n=2)
        a = from_files.delta_h1(E, U, with_second_order=False)
        b = live.delta_h1(E, U, with_second_order=False)
    assert a.delta_h1 == pytest.approx(b.delta_h1, rel=1e-6, abs=1e-12) and a.delta_h1 != 0


def test_realised_step_rounds_to_the_weights_dtype():
    """round(θ + Δθ) − θ: in bf16 a step below half an element's spacing is lost, one above moves by a whole
    spacing; in float32 it is Δθ up to float32 rounding."""
    from entropy_probe.update import realised_step

    theta = torch.tensor([1.0, 1.0, 0.001, -2.0], dtype=torch.bfloat16)
    delta = torch.tensor([1e-3, 6e-3, 1e-5, 0.0], dtype=torch.float64)  # bf16 spacing: 2⁻⁷ at 1.0, 2⁻¹⁷ at 0.001
    assert realised_step(theta, delta).tolist() == [0.0, 2**-7, 2**-17, 0.0]
    theta32 = theta.float()
    assert torch.allclose(realised_step(theta32, delta), delta, rtol=0, atol=2 * FP32_EPS)


def test_a_bf16_model_reports_the_step_its_next_forward_sees(full_run):
    """Loaded in bf16 with a full-parameter lr of 1e-6, most of the emulated Adam step is below bf16's
    resolution: delta-h1 reports δH₁ along the rounded step beside δH₁ along Δθ."""
    params = params_for(full_run, 2, checkpoint={"dtype": "bf16", "learning_rate": 1e-6})
    probe = Probe.from_checkpoint(params.checkpoint.path, params=params)
    with one_thread():
        result = probe.delta_h1(probe.sample_e(n=8), probe.sample_u(n=2), with_second_order=False)
    realised = result.report.realised_step
    assert realised is not None and realised.dtype == "bfloat16"
    assert realised.fraction_unmoved > 0.5 and 0.3 < realised.fraction_lost <= 1.5
    assert realised.delta_h1 != result.delta_h1
    fp32 = Probe.from_checkpoint(params.checkpoint.path, params=params_for(full_run, 2))
    assert fp32.delta_h1(fp32.sample_e(n=4), fp32.sample_u(n=2), with_second_order=False).report.realised_step is None
