"""FSDP2 checkpoints of the Hugging Face Trainer through accelerate (torch distributed checkpoints in checkpoint-N/).

The fixture (tests/fixtures/accelerate_fsdp/, made by tests/fixtures/make_accelerate_fsdp_checkpoints.py, which
names the versions) is a real 2-rank CPU run of `transformers.Trainer` with fsdp_config version 2 and
SHARDED_STATE_DICT: the tiny tied Qwen2 trained full-parameter for 3 steps (causal-LM loss, adamw_torch with
weight decay 0.1 on the decay group, max_grad_norm 1.0), a checkpoint after each, the base model it started from
in base/, and the live state gathered at each save in reference/ (independent of this reader). No test trains or
starts a process group: reading needs torch only.
"""

from __future__ import annotations

import fractions
import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_pipeline import observed_delta_h1, run_cli_pipeline
from safetensors import safe_open
from safetensors.torch import load_file
from trainer_ckpt import adamw_ulps

from entropy_probe.checkpoint import detect_format
from entropy_probe.errors import ProbeError
from entropy_probe.params import validate_params
from entropy_probe.probe import Probe
from entropy_probe.sources.accelerate_fsdp import (
    DcpReader,
    FsdpState,
    _nested,
    find_fsdp_checkpoint,
    read_fsdp_state,
)

FIXTURES = Path(__file__).parent / "fixtures" / "accelerate_fsdp"
BASE = FIXTURES / "base"
STEPS = (1, 2, 3)
MOMENTS = ("exp_avg", "exp_avg_sq")


def checkpoint(step: int) -> Path:
    return FIXTURES / "run" / f"checkpoint-{step}"


def params_for(path: Path, **checkpoint_keys) -> object:
    keys = {"path": str(path), "dtype": "fp32", "device_map": "cpu", "base_model": str(BASE), **checkpoint_keys}
    return validate_params(
        {"checkpoint": keys, "batch_config": {"dataset_name": "arithmetic:3", "B_E": 48, "B_U": 4, "G": 4}}
    )


def read(step: int, trust_pickles: bool = False) -> FsdpState:
    return read_fsdp_state(find_fsdp_checkpoint(checkpoint(step)), trust_pickles)


def live(step: int) -> tuple[dict, list, list]:
    """The reference gathered at save time: tensors, the optimizer's groups, the scheduler's last lr."""
    path = FIXTURES / "reference" / f"checkpoint-{step}.live.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return load_file(path), json.loads(meta["groups"]), json.loads(meta["scheduler_last_lr"])


def dcp_save(state_dict: dict, folder: Path) -> None:
    """torch's own DCP writer in this one process (no process group: torch warns that it assumes one process)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)


@pytest.fixture(scope="module")
def probes() -> dict[int, Probe]:
    """Each checkpoint loaded once, as verify loads it (format detected, base_model set)."""
    return {k: Probe.from_checkpoint(checkpoint(k), params=params_for(checkpoint(k))) for k in STEPS}


def copy_checkpoint(tmp_path: Path, step: int = 2) -> Path:
    return Path(shutil.copytree(checkpoint(step), tmp_path / "run" / f"checkpoint-{step}"))


def one_line_refusal(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(ProbeError, match=match) as refused:
        call(*args, **kwargs)
    assert "\n" not in str(refused.value)
    return str(refused.value)


# ----------------------------------------------------------------------------------------------
# what the Trainer wrote


def test_the_layout_the_trainer_writes():
    """checkpoint-N holds the two DCP folders and the Trainer's scheduler.pt and trainer_state.json, no
    config.json, weights, tokenizer or training_args.bin. The model folder keys the module state dict (lm_head
    saved beside the embedding it is tied to) and cuts every tensor into row chunks, one per rank; the optimizer
    folder keys the state by parameter name (the tied head has none) and keeps the Trainer's two groups."""
    ckpt = checkpoint(2)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer_0",
        "pytorch_model_fsdp_0",
        "scheduler.pt",
        "trainer_state.json",
    ]
    for folder in ("optimizer_0", "pytorch_model_fsdp_0"):
        assert sorted(p.name for p in (ckpt / folder).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    model = DcpReader(ckpt / "pytorch_model_fsdp_0")
    assert model.path("model.lm_head.weight") == ("model", "lm_head.weight")
    embed = model.metadata.state_dict_metadata["model.model.embed_tokens.weight"]
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in embed.chunks] == [((0, 0), (8, 16)), ((8, 0), (8, 16))]
    optimizer = _nested(DcpReader(ckpt / "optimizer_0"), "optimizer")
    assert "lm_head.weight" not in optimizer["state"] and "model.embed_tokens.weight" in optimizer["state"]
    decay, no_decay = optimizer["param_groups"][0], optimizer["param_groups"][1]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(n.endswith(("norm.weight", ".bias")) for n in no_decay["params"]) and no_decay["params"]
    assert detect_format(params_for(ckpt).checkpoint) == "accelerate-fsdp"


# ----------------------------------------------------------------------------------------------
# the state against the live optimizer


@pytest.mark.parametrize("step", STEPS)
def test_matches_the_live_state_at_save_time(step):
    """Bit for bit the fp32 weights and moments gathered from the live module and optimizer when the Trainer
    saved, Adam's step, and each group's lr, betas, eps, decay and names; the group lr is the scheduler's last
    lr, the one the next step applies (trainer_state.json logs the lr of the steps already taken)."""
    state = read(step)
    tensors, live_groups, scheduler_lr = live(step)
    live_names = sorted(k.split("/", 1)[1] for k in tensors if k.startswith("weight/"))
    assert sorted(set(state.weights) - {"lm_head.weight"}) == live_names
    assert torch.equal(state.weights["lm_head.weight"], state.weights["model.embed_tokens.weight"])  # tied, saved twice
    for name in live_names:
        weight = state.weights[name]
        assert weight.dtype == torch.float32 and torch.equal(weight, tensors[f"weight/{name}"]), name
    assert sorted(state.names) == live_names
    for name in state.names:
        for key in MOMENTS:
            assert torch.equal(getattr(state, key)[name], tensors[f"{key}/{name}"]), (name, key)
        assert state.step[name] == tensors[f"step/{name}"].item() == step
    kept = ("lr", "betas", "eps", "weight_decay", "names")
    assert [{k: g[k] for k in kept} for g in state.groups] == [{**g, "betas": tuple(g["betas"])} for g in live_groups]
    assert [g["lr"] for g in state.groups] == scheduler_lr
    logged = json.loads((checkpoint(step) / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in logged if "learning_rate" in e] == list(range(1, step + 1))


def test_the_probe_loads_the_model_and_its_groups(probes):
    """The policy is the base's architecture with the checkpoint's weights, every parameter trainable, the head
    tied to the embedding (one parameter, one state); the AdamW state is the live one, in the Trainer's groups."""
    probe = probes[2]
    tensors, live_groups, _ = live(2)
    assert probe.paths.format == "accelerate-fsdp" and probe.paths.checkpoint_dir == checkpoint(2)
    assert probe.model.lm_head.weight is probe.model.model.embed_tokens.weight
    assert not probe.model.training and all(p.requires_grad for p in probe.model.parameters())
    for name, p in probe.model.named_parameters():
        assert torch.equal(p.detach(), tensors[f"weight/{name}"]), name
        assert torch.equal(probe.optimizer.exp_avg_sq[name], tensors[f"exp_avg_sq/{name}"]), name
    assert [g["names"] for g in probe.optimizer.groups] == [g["names"] for g in live_groups]
    assert probe.learning_rate == live_groups[0]["lr"] and probe.trainer.global_step == 2


@pytest.mark.numerics
@pytest.mark.parametrize("step", (1, 2))
def test_consecutive_checkpoints_differ_by_one_adamw_step(probes, step):
    """θ(k+1) − θ(k), found as the run's next checkpoint-N, is torch AdamW's step from checkpoint k+1's moments and
    step count with checkpoint k's lr (the next step's) and each group's decay: to a few ulps of θ."""
    this, nxt = probes[step], probes[step + 1]
    observed = this.observed_step().observed
    assert (observed.record.step, observed.record.next_step) == (step, step + 1)
    assert observed.record.next_checkpoint == str(checkpoint(step + 1))
    assert all(nxt.optimizer.step[n] == this.optimizer.step[n] + 1 for n in this.optimizer.names)
    assert float(observed.delta_theta.abs().max()) > 0
    worst = adamw_ulps(this, nxt, observed.delta_theta)
    assert worst < 4, f"observed step differs from AdamW's by {worst:.2f} ulp of θ"


# ----------------------------------------------------------------------------------------------
# the pipeline


def test_cli_pipeline_and_exact_enumeration(tmp_path):
    """verify → sample-e → sample-u → delta-h1 → exact on checkpoint-1 (every parameter; the base named by
    checkpoint.base_model): δH₁ against exact enumeration (|z| < 3) and the FD check; the observed rule to
    checkpoint-2."""
    checkpoint_keys = {"path": str(checkpoint(1)), "base_model": str(BASE)}
    verify = run_cli_pipeline(tmp_path, checkpoint_keys, generation={"max_new_tokens": 3})
    assert verify["checkpoint"]["format"] == "accelerate-fsdp" and verify["trainer_config_source"] is None
    assert any("every parameter is trainable" in c for c in verify["checks"])
    assert observed_delta_h1(tmp_path)["update"]["observed"]["next_step"] == 2


# ----------------------------------------------------------------------------------------------
# refusals: one line naming the problem and the fix


def test_without_base_model_it_is_refused_naming_the_knob():
    params = params_for(checkpoint(2), base_model=None)
    message = one_line_refusal(
        r"saved without config\.json or tokenizer", Probe.from_checkpoint, checkpoint(2), params=params
    )
    assert "set checkpoint.base_model to the model the run started from" in message


def test_a_base_of_another_layout_is_refused(tmp_path):
    """An untied base: the head is a parameter of its own, which the run's optimizer never stepped."""
    from entropy_probe.tiny import build_model

    untied = tmp_path / "untied"
    build_model(hidden_size=16, num_layers=1, num_heads=4, tie_word_embeddings=False).save_pretrained(untied)
    params = params_for(checkpoint(2), base_model=str(untied))
    one_line_refusal(
        r"lm_head\.weight is in no optimizer param group", Probe.from_checkpoint, checkpoint(2), params=params
    )


@pytest.mark.parametrize(
    "folder, missing, match",
    [
        ("optimizer_0", "__1_0.distcp", r"optimizer_0 lacks __1_0\.distcp, which its \.metadata names"),
        (
            "pytorch_model_fsdp_0",
            ".metadata",
            r"holds 2 \.distcp files but no \.metadata .*hidden \.metadata files included",
        ),
    ],
    ids=["rank file", "metadata"],
)
def test_a_missing_file_is_named(tmp_path, folder, missing, match):
    ckpt = copy_checkpoint(tmp_path)
    (ckpt / folder / missing).unlink()
    params = params_for(ckpt)
    one_line_refusal(match, Probe.from_checkpoint, ckpt, params=params)


def test_a_missing_folder_is_named(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    shutil.rmtree(ckpt / "optimizer_0")
    one_line_refusal(r"lacks its optimizer_0/ folder", find_fsdp_checkpoint, ckpt)


@pytest.mark.parametrize(
    "files, match",
    [
        (["pytorch_model_fsdp_rank0.bin", "pytorch_model_fsdp_rank1.bin"], r"FSDP1's LOCAL_STATE_DICT, flat parameter"),
        (["pytorch_model_fsdp.bin", "optimizer.bin"], r"FULL_STATE_DICT"),
    ],
    ids=["fsdp1 flat", "full state dict"],
)
def test_other_fsdp_saves_are_refused_with_the_way_out(tmp_path, files, match):
    """accelerate's saves without the DCP folders (FSDP1's flat shards; a full state dict) are detected as this
    format and refused, saying to train with FSDP2 and SHARDED_STATE_DICT."""
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    for name in files:
        (ckpt / name).write_bytes(b"")
    (ckpt / "trainer_state.json").write_text("{}")
    assert detect_format(params_for(ckpt).checkpoint) == "accelerate-fsdp"
    message = one_line_refusal(match, Probe.from_checkpoint, ckpt, params=params_for(ckpt))
    assert "version: 2" in message and "SHARDED_STATE_DICT" in message


def test_flat_parameter_names_are_fsdp1(tmp_path):
    """A DCP model folder whose entries are FSDP1's flat parameters (no parameter names) is refused."""
    ckpt = copy_checkpoint(tmp_path)
    model_dir = ckpt / "pytorch_model_fsdp_0"
    shutil.rmtree(model_dir)
    dcp_save({"model": {"_fsdp_wrapped_module._flat_param": torch.zeros(8)}}, model_dir)
    one_line_refusal(r"FSDP1's flat parameters.*fsdp_config version: 2", read_fsdp_state, find_fsdp_checkpoint(ckpt))


def resave_optimizer(ckpt: Path, edit) -> None:
    """Rewrite optimizer_0 as one rank's DCP of the edited optimizer dict (torch's own writer, no process group)."""
    optim_dir = ckpt / "optimizer_0"
    saved = _nested(DcpReader(optim_dir), "optimizer")
    saved["param_groups"] = [saved["param_groups"][g] for g in sorted(saved["param_groups"])]
    edit(saved)
    shutil.rmtree(optim_dir)
    dcp_save({"optimizer": saved}, optim_dir)


def test_a_single_rank_rewrite_reads_the_same(tmp_path):
    """The reader joins whatever chunks .metadata lists: one rank's file of full tensors gives the same state."""
    ckpt = copy_checkpoint(tmp_path)
    resave_optimizer(ckpt, lambda saved: None)
    assert sorted(p.name for p in (ckpt / "optimizer_0").iterdir()) == [".metadata", "__0_0.distcp"]
    rewritten, original = read_fsdp_state(find_fsdp_checkpoint(ckpt)), read(2)
    assert rewritten.groups == original.groups and rewritten.step == original.step
    for name in original.names:
        assert torch.equal(rewritten.exp_avg[name], original.exp_avg[name])


def test_state_that_is_not_adamw_is_refused(tmp_path):
    """bitsandbytes' 8-bit AdamW keeps state1/state2, not exp_avg/exp_avg_sq; torch AdamW keeps its moments in the
    parameter's dtype (other dtypes: a low-bit optimizer); amsgrad is not plain AdamW."""

    def eight_bit(saved):
        for entry in saved["state"].values():
            entry["state1"], entry["state2"] = entry.pop("exp_avg"), entry.pop("exp_avg_sq")

    ckpt = copy_checkpoint(tmp_path)
    resave_optimizer(ckpt, eight_bit)
    one_line_refusal(
        r"\['state1', 'state2', 'step'\], not exp_avg, exp_avg_sq and step .*optim=adamw_torch",
        read_fsdp_state,
        find_fsdp_checkpoint(ckpt),
    )

    def bf16_moments(saved):
        for entry in saved["state"].values():
            entry["exp_avg"] = entry["exp_avg"].to(torch.bfloat16)

    ckpt = copy_checkpoint(tmp_path / "bf16")
    resave_optimizer(ckpt, bf16_moments)
    match = r"exp_avg of model\.embed_tokens\.weight is torch\.bfloat16, the weight torch\.float32: not torch AdamW"
    one_line_refusal(match, read_fsdp_state, find_fsdp_checkpoint(ckpt))

    ckpt = copy_checkpoint(tmp_path / "amsgrad")
    resave_optimizer(ckpt, lambda saved: saved["param_groups"][0].update(amsgrad=True))
    params = params_for(ckpt)
    one_line_refusal(r"param group 0 uses amsgrad=True", Probe.from_checkpoint, ckpt, params=params)


def test_a_foreign_type_in_the_metadata_is_refused_unless_trusted(tmp_path):
    """.metadata is a pickle: read with an allow-list of DCP's metadata types; anything else needs trust_pickles."""
    ckpt = copy_checkpoint(tmp_path)
    path = ckpt / "optimizer_0" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    metadata.storage_meta.modules = [fractions.Fraction(1, 3)]
    path.write_bytes(pickle.dumps(metadata))
    one_line_refusal(
        r"pickles fractions\.Fraction.*checkpoint\.trust_pickles: true", read_fsdp_state, find_fsdp_checkpoint(ckpt)
    )
    trusted, original = read_fsdp_state(find_fsdp_checkpoint(ckpt), trust_pickles=True), read(2)
    for name in original.names:
        assert torch.equal(trusted.exp_avg_sq[name], original.exp_avg_sq[name])


def test_a_truncated_rank_file_is_refused(tmp_path):
    ckpt = copy_checkpoint(tmp_path)
    shard = ckpt / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:5000])
    one_line_refusal(
        r"__1_0\.distcp ends before the chunk of .* \(truncated\)", read_fsdp_state, find_fsdp_checkpoint(ckpt)
    )


def test_the_step_is_the_checkpoints_not_the_base_models(tmp_path):
    """The weights_dir of this format is the base model (its config.json); a base saved as an SFT `checkpoint-K`
    must not stand for the checkpoint's step (`observed.checkpoint_step` reads `checkpoint_dir`)."""
    from entropy_probe.observed import checkpoint_step
    from entropy_probe.sources import source_for

    base = tmp_path / "checkpoint-99"
    shutil.copytree(BASE, base)
    params = params_for(checkpoint(2), base_model=str(base)).checkpoint
    paths = source_for(params).resolve(params)
    assert paths.weights_dir.name == "checkpoint-99" and checkpoint_step(paths) == 2
