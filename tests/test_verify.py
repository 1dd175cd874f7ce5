"""The `verify` stage: artifacts round-trip, learning-rate choice, bad inputs refused with nothing written, CLI."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from trainer_ckpt import save_base, write_trainer_checkpoint  # noqa: E402

from entropy_probe.artifacts.verify import (  # noqa: E402
    STATE_FILE,
    STATE_KIND,
    CheckpointIdentity,
    Parameter,
    VerifyReport,
    read_verify,
    write_verify,
)
from entropy_probe.checkpoint import AdapterInfo, CheckpointPaths  # noqa: E402
from entropy_probe.errors import ProbeError  # noqa: E402
from entropy_probe.files import read_tensors  # noqa: E402
from entropy_probe.optimizer_state import OptimizerState, ParamGroup  # noqa: E402
from entropy_probe.outputs import MANIFEST  # noqa: E402
from entropy_probe.params import validate_params  # noqa: E402
from entropy_probe.trainer_config import TrainerConfig  # noqa: E402
from stages import verify  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape", "ignore:Paged optimizers")


def make_params(ckpt_dir, **kw):
    return validate_params({"checkpoint": {"path": str(ckpt_dir), "dtype": "fp32", "device_map": "cpu", **kw}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real tiny Trainer-layout runs sharing one base: the normal one and the ones that must be refused."""
    root = tmp_path_factory.mktemp("runs")
    base = save_base(root)
    return {
        "ok": write_trainer_checkpoint(root / "ok", base_dir=base),  # 3 of 6 steps
        "ended": write_trainer_checkpoint(root / "ended", base_dir=base, steps=3, total_steps=3),  # next lr 0
        "no_state": write_trainer_checkpoint(
            root / "ns", base_dir=base, no_grad_param="layers.1.self_attn.v_proj.lora_A"
        ),
        "rank4": write_trainer_checkpoint(root / "r4", base_dir=base, rank=4),
        "paged": write_trainer_checkpoint(root / "pg", base_dir=base, optim="paged_adamw_8bit"),
    }


def first_state_name(run) -> str:
    """Name of the parameter stored under state id 0 (first of the decay group), from the live optimizer."""
    p0 = run.optimizer.param_groups[0]["params"][0]
    return next(n for n, p in run.model.named_parameters() if p is p0)


# ---------------------------------------------------------------------------------------------- happy path


def test_verify_writes_state_and_report_that_read_back(runs, tmp_path):
    run = runs["ok"]
    out = tmp_path / "verify"
    summary = verify.run(make_params(run.dir), out, dry_run=False)
    report, state = read_verify(out)
    assert summary == (
        f"verify: peft-adapter, {len(state.names)} trainable tensors ({report.n_trainable} values), "
        f"lr={report.learning_rate:g} (next {run.lr_next:g}, last {run.lr_last}), step 3 -> {out}"
    )

    live_params = dict(run.model.named_parameters())
    trainable = [n for n, p in live_params.items() if p.requires_grad]
    assert sorted(state.names) == sorted(trainable)
    for n in state.names:
        live = run.optimizer.state[live_params[n]]
        assert torch.equal(state.exp_avg[n], live["exp_avg"]) and torch.equal(state.exp_avg_sq[n], live["exp_avg_sq"])
        assert state.step[n] == float(live["step"])
    tensors, meta = read_tensors(out / STATE_FILE, STATE_KIND)
    assert tensors[f"step.{state.names[0]}"].dtype == torch.float64 and tensors[f"step.{state.names[0]}"].dim() == 0
    assert meta["fingerprint"] == report.fingerprint and len(report.fingerprint) == 16

    assert report.learning_rate == report.learning_rate_next == pytest.approx(run.lr_next)
    assert report.learning_rate_last == pytest.approx(run.lr_last) and run.lr_last > run.lr_next > 0
    assert report.step == 3 and report.global_step == 3
    assert report.adapter.rank == 2 and report.adapter.alpha == 4
    assert report.adapter.targets == ["q_proj", "v_proj"]
    assert [p.name for p in report.parameters] == state.names
    assert all(p.shape == list(live_params[p.name].shape) for p in report.parameters)
    assert report.n_trainable == sum(live_params[n].numel() for n in trainable)
    assert [g["names"] for g in report.param_groups] == [g["names"] for g in state.groups]
    assert [g["weight_decay"] for g in report.param_groups] == [0.1, 0.0]
    assert report.checks and not report.warnings
    raw = json.loads((out / VerifyReport.FILE).read_text())
    assert "load_seconds" not in raw and raw["param_groups"] == report.param_groups  # no timings in the file
    assert set(raw["trainer_config"]) >= {"loss_type", "temperature", "max_grad_norm", "num_generations"}
    assert report.trainer_config.loss_type is None  # trust_pickles is off by default
    assert report.use_qlora is False and report.dtype == "fp32"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [STATE_FILE, VerifyReport.FILE, CheckpointIdentity.FILE, MANIFEST]
    )
    identity = json.loads((out / CheckpointIdentity.FILE).read_text())
    assert identity == {
        k: raw[k]
        for k in ("fingerprint", "checkpoint", "base_model", "adapter", "trainer_config", "trainer_config_source")
    }
    assert CheckpointIdentity.read(out) == report.identity()


def test_trust_pickles_fills_trainer_config(runs, tmp_path):
    run = runs["ok"]
    verify.run(make_params(run.dir, trust_pickles=True), tmp_path / "v", dry_run=False)
    report, _ = read_verify(tmp_path / "v")
    tc = report.trainer_config
    assert tc.loss_type == run.args.loss_type and tc.temperature == run.args.temperature
    assert tc.num_generations == run.args.num_generations and report.max_grad_norm == run.args.max_grad_norm


@pytest.mark.parametrize("setting", ["last", 0.0123])
def test_learning_rate_setting(runs, tmp_path, setting):
    run = runs["ok"]
    verify.run(make_params(run.dir, learning_rate=setting), tmp_path / "v", dry_run=False)
    report, _ = read_verify(tmp_path / "v")
    assert report.learning_rate == pytest.approx(run.lr_last if setting == "last" else setting)
    assert report.learning_rate_next == pytest.approx(run.lr_next)


def test_end_of_schedule_works_with_last(runs, tmp_path):
    run = runs["ended"]
    assert run.lr_next == 0 and run.lr_last > 0
    verify.run(make_params(run.dir, learning_rate="last"), tmp_path / "v", dry_run=False)
    report, _ = read_verify(tmp_path / "v")
    assert report.learning_rate == pytest.approx(run.lr_last) and report.learning_rate_next == 0


def test_dry_run_prints_plan_and_writes_nothing(runs, tmp_path):
    out = verify.run(make_params(runs["ok"].dir), tmp_path / "v", dry_run=True)
    assert out.startswith("verify plan:")
    assert "optimizer.pt" in out and "verify.json" in out and "rank=2" in out
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize(
    "checkpoint, base, fmt",
    [
        ("verl/full_w2/global_step_1", None, "verl-fsdp"),
        ("deepspeed/zero1_w3/checkpoint-2", None, "deepspeed-zero"),
        ("accelerate_fsdp/run/checkpoint-1", "accelerate_fsdp/base", "accelerate-fsdp"),
    ],
)
def test_dry_run_plans_every_sharded_format(tmp_path, checkpoint, base, fmt):
    """The plan comes from the checkpoint's own source (it used to assume an adapter or a full model's files)."""
    from entropy_probe.params import validate_params

    fixtures = Path(__file__).parent / "fixtures"
    ckpt = {"path": str(fixtures / checkpoint), "base_model": None if base is None else str(fixtures / base)}
    out = verify.run(validate_params({"checkpoint": ckpt}), tmp_path / "v", dry_run=True)
    assert out.startswith("verify plan:") and f"format               {fmt}" in out
    assert not (tmp_path / "v").exists()


def test_qlora_verify_matches_lora(runs, tmp_path):
    run = runs["ok"]
    verify.run(make_params(run.dir), tmp_path / "lora", dry_run=False)
    verify.run(make_params(run.dir, use_qlora=True), tmp_path / "qlora", dry_run=False)
    (rl, sl), (rq, sq) = read_verify(tmp_path / "lora"), read_verify(tmp_path / "qlora")
    assert sq.names == sl.names and rq.fingerprint == rl.fingerprint and rq.use_qlora is True
    assert all(torch.equal(sq.exp_avg[n], sl.exp_avg[n]) for n in sl.names)


# ---------------------------------------------------------------------------------------------- refusals


def _bad_checkpoint(runs, tmp_path, case) -> tuple[dict, str]:
    """A copy of a run made bad in one way; returns (checkpoint params, regex the error must match)."""
    src = {"no_state": runs["no_state"], "ended": runs["ended"]}.get(case, runs["ok"])
    ck = tmp_path / "ck"
    shutil.copytree(src.dir, ck)
    kw: dict = {"path": str(ck)}
    opt = ck / "optimizer.pt"
    name0 = first_state_name(src)
    if case == "missing_optimizer":
        opt.unlink()
        return kw, r"optimizer\.pt not found .*checkpoint\.optimizer_path"
    if case == "truncated_optimizer":
        data = opt.read_bytes()
        opt.write_bytes(data[: len(data) // 2])
        return kw, r"not readable with torch\.load"
    if case == "other_rank":
        kw["optimizer_path"] = str(runs["rank4"].dir / "optimizer.pt")
        return kw, r"shape \(\d+, \d+\).*different LoRA rank"
    if case == "no_state":
        return kw, rf"{runs['no_state'].no_grad_name} has no optimizer state"
    if case == "ended":
        return (
            kw,
            r"learning rate \(next\) is 0.*last applied lr = 0\.00\d+.*checkpoint\.learning_rate to last or a number",
        )
    sd = torch.load(opt, weights_only=True)
    if case == "nan":
        sd["state"][0]["exp_avg_sq"].view(-1)[1] = float("nan")
        pattern = rf"exp_avg_sq of {name0} contains NaN"
    elif case == "no_step":
        del sd["state"][0]["step"]
        pattern = rf"optimizer state of {name0} lacks \['step'\]"
    elif case == "three_groups":
        g = sd["param_groups"][0]
        sd["param_groups"] = [dict(g, params=g["params"][:2]), dict(g, params=g["params"][2:])] + sd["param_groups"][1:]
        pattern = r"3 param groups of sizes \[2, 6, 4\].*optimizer_param_names\.json"
    else:
        raise AssertionError(case)
    torch.save(sd, opt)
    return kw, pattern


BAD_CASES = [
    "missing_optimizer",
    "truncated_optimizer",
    "other_rank",
    "nan",
    "no_state",
    "no_step",
    "ended",
    "three_groups",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_error_and_nothing_written(runs, tmp_path, case):
    kw, pattern = _bad_checkpoint(runs, tmp_path, case)
    params = validate_params({"checkpoint": {"dtype": "fp32", "device_map": "cpu", **kw}})
    out_parent = tmp_path / "data"
    out_parent.mkdir()
    (out_parent / "verify").mkdir()
    (out_parent / "verify" / "old.txt").write_text("previous run")
    with pytest.raises(ProbeError, match=pattern) as err:
        verify.run(params, out_parent / "verify", dry_run=False)
    assert "\n" not in str(err.value)
    assert [p.name for p in out_parent.iterdir()] == ["verify"]  # no temp dirs left behind
    assert [p.name for p in (out_parent / "verify").iterdir()] == ["old.txt"]  # previous output untouched


def test_a_bitsandbytes_paged_8bit_state_is_read(runs, tmp_path):
    """The Trainer's paged_adamw_8bit: verify passes and every moment is the saved bitsandbytes state, dequantised
    where it is 8-bit (`optimizer_state.dequantised_bnb_state`, tested against bitsandbytes in test_bnb_state.py)."""
    from entropy_probe.optimizer_state import dequantised_bnb_state

    run = runs["paged"]
    verify.run(make_params(run.dir), tmp_path / "v", dry_run=False)
    _, state = read_verify(tmp_path / "v")
    saved = torch.load(run.dir / "optimizer.pt", weights_only=True)["state"]
    assert all("__bnb_optimizer_quant_state__" in st for st in saved.values())
    for i, name in enumerate(state.names):  # Trainer groups: the ids follow the names in optimizer order
        expected = dequantised_bnb_state(saved[i], name)
        assert torch.equal(state.exp_avg[name], expected["exp_avg"]) and state.step[name] == expected["step"]
        assert torch.equal(state.exp_avg_sq[name], expected["exp_avg_sq"])


def test_last_without_trainer_state_is_refused(runs, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(runs["ok"].dir, ck)
    (ck / "trainer_state.json").unlink()
    with pytest.raises(ProbeError, match="no trainer_state.json.*learning_rate to next or a number"):
        verify.run(make_params(ck, learning_rate="last"), tmp_path / "v", dry_run=False)
    assert not (tmp_path / "v").exists()


def test_read_verify_refuses_mismatched_or_missing_artifacts(runs, tmp_path):
    out = tmp_path / "v"
    verify.run(make_params(runs["ok"].dir), out, dry_run=False)
    report = (out / VerifyReport.FILE).read_text()
    (out / VerifyReport.FILE).write_text(report.replace('"fingerprint": "', '"fingerprint": "0', 1))
    with pytest.raises(ProbeError, match="does not belong to verify.json.*rerun entropy-probe verify"):
        read_verify(out)
    with pytest.raises(ProbeError, match="not found"):
        read_verify(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- CLI


def _cli(tmp_path, checkpoint: dict, out: Path):
    from typer.testing import CliRunner

    from stages.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"checkpoint": {"dtype": "fp32", "device_map": "cpu", **checkpoint}}))
    return CliRunner().invoke(app, ["verify", "--params", str(params_file), "--out", str(out)])


def test_cli_bad_input_exits_2_with_one_line(runs, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(runs["ok"].dir, ck)
    (ck / "optimizer.pt").unlink()
    result = _cli(tmp_path, {"path": str(ck)}, tmp_path / "v")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("entropy-probe verify: error: optimizer.pt not found")
    assert not (tmp_path / "v").exists()


def test_cli_good_input_writes_artifacts(runs, tmp_path):
    result = _cli(tmp_path, {"path": str(runs["ok"].dir)}, tmp_path / "v")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "v" / VerifyReport.FILE).exists() and (tmp_path / "v" / STATE_FILE).exists()


# ---------------------------------------------------------------------------------------------- the contract


def handmade(tmp_path) -> tuple[VerifyReport, OptimizerState]:
    """A verify report and optimizer state built by hand (two groups, bf16 and fp32 moments), no model."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"m.q.lora_A.default.weight": (2, 8), "m.q.lora_B.default.bias": (8,)}
    names = list(shapes)
    groups = [
        ParamGroup(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.1, names=names[:1]),
        ParamGroup(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, names=names[1:]),
    ]
    state = OptimizerState(
        names=names,
        exp_avg={
            n: torch.randn(s, generator=gen).to(torch.bfloat16 if i else torch.float32)
            for i, (n, s) in enumerate(shapes.items())
        },
        exp_avg_sq={n: torch.rand(s, generator=gen) for n, s in shapes.items()},
        step={n: 3.0 for n in names},
        groups=groups,
        mapping="Trainer groups (decay, no-decay)",
    )
    paths = CheckpointPaths(
        weights_dir=tmp_path / "ck",
        optimizer_path=tmp_path / "ck" / "optimizer.pt",
        scheduler_path=None,
        trainer_state_path=None,
        training_args_path=None,
        base_model="org/base",
        name_map_path=None,
        trainer_config_path=None,
    )
    adapter = AdapterInfo(
        peft_type="LORA",
        rank=2,
        alpha=4,
        targets=["q_proj"],
        modules_to_save=None,
        use_rslora=False,
        use_dora=False,
        lora_bias=False,
        base_model_name_or_path="org/base",
    )
    report = VerifyReport(
        fingerprint="0123456789abcdef",
        checkpoint=paths,
        base_model="org/base",
        adapter=adapter,
        use_qlora=False,
        dtype="fp32",
        device_map="cpu",
        parameters=[
            Parameter(name=n, shape=list(s), numel=math.prod(s), group=i) for i, (n, s) in enumerate(shapes.items())
        ],
        n_trainable=24,
        n_trainable_tensors=2,
        optimizer_mapping=state.mapping,
        param_groups=groups,
        learning_rate=1e-3,
        learning_rate_setting="next",
        learning_rate_next=1e-3,
        learning_rate_last=1.5e-3,
        step=3,
        global_step=3,
        max_grad_norm=1.0,
        trainer_config=TrainerConfig(loss_type="grpo", temperature=0.7),
        trainer_config_source="trainer_config.json",
        checks=["a check"],
        warnings=[],
    )
    return report, state


def test_contract_round_trips_report_identity_and_state_exactly(tmp_path):
    report, state = handmade(tmp_path)
    out = tmp_path / "v"
    write_verify(out, report, state)
    assert sorted(p.name for p in out.iterdir()) == sorted([STATE_FILE, VerifyReport.FILE, CheckpointIdentity.FILE])
    back, back_state = read_verify(out)
    assert back == report and CheckpointIdentity.read(out) == report.identity()
    assert isinstance(back.step, int) and isinstance(back.learning_rate_setting, str)
    assert back_state.names == state.names and back_state.groups == state.groups
    assert back_state.mapping == state.mapping and back_state.group_of == {state.names[0]: 0, state.names[1]: 1}
    for n in state.names:  # bit-exact, dtype kept
        assert back_state.exp_avg[n].dtype == state.exp_avg[n].dtype
        assert torch.equal(back_state.exp_avg[n], state.exp_avg[n])
        assert torch.equal(back_state.exp_avg_sq[n], state.exp_avg_sq[n]) and back_state.step[n] == 3.0
    raw = json.loads((out / VerifyReport.FILE).read_text())
    assert raw["checkpoint"]["weights_dir"] == str(tmp_path / "ck") and raw["trainer_config"]["top_p"] is None


def _edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _edit_state(path: Path, edit) -> None:
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


A, B = "m.q.lora_A.default.weight", "m.q.lora_B.default.bias"
MALFORMED = {
    "no verify.json": (lambda d: (d / "verify.json").unlink(), r"verify output .*verify\.json not found"),
    "not JSON": (lambda d: (d / "verify.json").write_text("{"), r"verify\.json is not valid JSON"),
    "missing key": (
        lambda d: _edit_json(d / "verify.json", lambda r: r.pop("param_groups")),
        r"not a valid verify\.json of this version \(param_groups: Field required\).*rerun the verify",
    ),
    "unknown key": (
        lambda d: _edit_json(d / "verify.json", lambda r: r.update(load_seconds=1.0)),
        r"\(load_seconds: Extra inputs",
    ),
    "nested unknown key": (
        lambda d: _edit_json(d / "verify.json", lambda r: r["param_groups"][0].update(momentum=0)),
        r"\(param_groups\.0\.momentum: Extra inputs",
    ),
    "wrong type": (
        lambda d: _edit_json(d / "verify.json", lambda r: r["parameters"][0].update(shape="2x8")),
        r"\(parameters\.0\.shape: ",
    ),
    "zero lr": (
        lambda d: _edit_json(d / "verify.json", lambda r: r.update(learning_rate=0)),
        r"\(learning_rate: Input should be greater than 0",
    ),
    "NaN": (
        lambda d: (d / "verify.json").write_text(
            (d / "verify.json").read_text().replace('"max_grad_norm": 1.0', '"max_grad_norm": NaN', 1)
        ),
        r"\(max_grad_norm: Input should be a finite number",
    ),
    "groups disagree": (
        lambda d: _edit_json(d / "verify.json", lambda r: r["param_groups"].reverse()),
        r"verify\.json: param_groups do not list the parameters in order",
    ),
    "other checkpoint": (
        lambda d: _edit_json(d / "verify.json", lambda r: r.update(fingerprint="fedcba9876543210")),
        r"does not belong to verify\.json \(checkpoint fedcba9876543210\).*rerun entropy-probe",
    ),
    "no state file": (lambda d: (d / STATE_FILE).unlink(), r"optimizer_state\.safetensors not found"),
    "truncated state": (
        lambda d: (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:100]),
        r"not a readable safetensors file",
    ),
    "foreign kind": (
        lambda d: _edit_state(d / STATE_FILE, lambda t, m: m.update(kind="bars")),
        r"holds 'bars', expected 'optimizer_state'",
    ),
    "missing tensor": (
        lambda d: _edit_state(d / STATE_FILE, lambda t, m: t.pop(f"step.{B}")),
        rf"lacks tensor step\.{B}.*rerun entropy-probe verify",
    ),
    "extra tensor": (
        lambda d: _edit_state(d / STATE_FILE, lambda t, m: t.update({"exp_avg.other": torch.zeros(1)})),
        r"holds tensor exp_avg\.other, which verify\.json does not list",
    ),
    "wrong shape": (
        lambda d: _edit_state(d / STATE_FILE, lambda t, m: t.update({f"exp_avg.{A}": torch.zeros(8, 2)})),
        rf"exp_avg\.{A} has shape \(8, 2\), expected \(2, 8\)",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_contract_refuses_malformed_files_with_one_line(tmp_path, case):
    report, state = handmade(tmp_path)
    out = tmp_path / "v"
    write_verify(out, report, state)
    read_verify(out)  # intact
    damage, pattern = MALFORMED[case]
    damage(out)
    with pytest.raises(ProbeError, match=pattern) as err:
        read_verify(out)
    assert "\n" not in str(err.value)


def test_write_verify_refuses_a_report_of_other_parameters(tmp_path):
    report, state = handmade(tmp_path)
    state.names.reverse()
    with pytest.raises(ValueError, match="other parameters"):
        write_verify(tmp_path / "v", report, state)
    assert not (tmp_path / "v").exists()
