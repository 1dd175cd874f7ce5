"""The `verify` stage: artifacts round-trip, learning-rate choice, bad inputs refused with nothing written, CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from trainer_ckpt import save_base, write_trainer_checkpoint  # noqa: E402

from entropy_probe import verify  # noqa: E402
from entropy_probe.files import read_tensors  # noqa: E402
from entropy_probe.outputs import MANIFEST  # noqa: E402
from entropy_probe.errors import ProbeError  # noqa: E402
from entropy_probe.params import validate_params  # noqa: E402

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
        "no_state": write_trainer_checkpoint(root / "ns", base_dir=base, no_grad_param="layers.1.self_attn.v_proj.lora_A"),
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
    verify.run(make_params(run.dir), out, dry_run=False)
    report, state = verify.read_verify(out)

    live_params = dict(run.model.named_parameters())
    trainable = [n for n, p in live_params.items() if p.requires_grad]
    assert sorted(state.names) == sorted(trainable)
    for n in state.names:
        live = run.optimizer.state[live_params[n]]
        assert torch.equal(state.exp_avg[n], live["exp_avg"]) and torch.equal(state.exp_avg_sq[n], live["exp_avg_sq"])
        assert state.step[n] == float(live["step"])
    tensors, meta = read_tensors(out / verify.STATE, verify.KIND)
    assert tensors[f"step.{state.names[0]}"].dtype == torch.float64 and tensors[f"step.{state.names[0]}"].dim() == 0
    assert meta["fingerprint"] == report["fingerprint"] and len(report["fingerprint"]) == 16

    assert report["learning_rate"] == report["learning_rate_next"] == pytest.approx(run.lr_next)
    assert report["learning_rate_last"] == pytest.approx(run.lr_last) and run.lr_last > run.lr_next > 0
    assert report["step"] == 3 and report["global_step"] == 3
    assert report["adapter"]["rank"] == 2 and report["adapter"]["alpha"] == 4
    assert report["adapter"]["targets"] == ["q_proj", "v_proj"]
    assert [p["name"] for p in report["parameters"]] == state.names
    assert all(p["shape"] == list(live_params[p["name"]].shape) for p in report["parameters"])
    assert report["n_trainable"] == sum(live_params[n].numel() for n in trainable)
    assert [g["names"] for g in report["param_groups"]] == [g["names"] for g in state.groups]
    assert [g["weight_decay"] for g in report["param_groups"]] == [0.1, 0.0]
    assert report["checks"] and not report["warnings"] and "load_seconds" not in report
    assert set(report["trainer_config"]) >= {"loss_type", "temperature", "max_grad_norm", "num_generations"}
    assert report["trainer_config"]["loss_type"] is None  # trust_pickles is off by default
    assert report["use_qlora"] is False and report["dtype"] == "fp32"
    assert sorted(p.name for p in out.iterdir()) == sorted([verify.STATE, verify.REPORT, verify.IDENTITY, MANIFEST])
    identity = json.loads((out / verify.IDENTITY).read_text())
    assert identity["fingerprint"] == report["fingerprint"] and "load_seconds" not in identity


def test_trust_pickles_fills_trainer_config(runs, tmp_path):
    run = runs["ok"]
    verify.run(make_params(run.dir, trust_pickles=True), tmp_path / "v", dry_run=False)
    report, _ = verify.read_verify(tmp_path / "v")
    tc = report["trainer_config"]
    assert tc["loss_type"] == run.args.loss_type and tc["temperature"] == run.args.temperature
    assert tc["num_generations"] == run.args.num_generations and report["max_grad_norm"] == run.args.max_grad_norm


@pytest.mark.parametrize("setting", ["last", 0.0123])
def test_learning_rate_setting(runs, tmp_path, setting):
    run = runs["ok"]
    verify.run(make_params(run.dir, learning_rate=setting), tmp_path / "v", dry_run=False)
    report, _ = verify.read_verify(tmp_path / "v")
    assert report["learning_rate"] == pytest.approx(run.lr_last if setting == "last" else setting)
    assert report["learning_rate_next"] == pytest.approx(run.lr_next)


def test_end_of_schedule_works_with_last(runs, tmp_path):
    run = runs["ended"]
    assert run.lr_next == 0 and run.lr_last > 0
    verify.run(make_params(run.dir, learning_rate="last"), tmp_path / "v", dry_run=False)
    report, _ = verify.read_verify(tmp_path / "v")
    assert report["learning_rate"] == pytest.approx(run.lr_last) and report["learning_rate_next"] == 0


def test_dry_run_prints_plan_and_writes_nothing(runs, tmp_path, capsys):
    verify.run(make_params(runs["ok"].dir), tmp_path / "v", dry_run=True)
    out = capsys.readouterr().out
    assert "optimizer.pt" in out and "verify.json" in out and "rank=2" in out
    assert not (tmp_path / "v").exists()


def test_qlora_verify_matches_lora(runs, tmp_path):
    run = runs["ok"]
    verify.run(make_params(run.dir), tmp_path / "lora", dry_run=False)
    verify.run(make_params(run.dir, use_qlora=True), tmp_path / "qlora", dry_run=False)
    (rl, sl), (rq, sq) = verify.read_verify(tmp_path / "lora"), verify.read_verify(tmp_path / "qlora")
    assert sq.names == sl.names and rq["fingerprint"] == rl["fingerprint"] and rq["use_qlora"] is True
    assert all(torch.equal(sq.exp_avg[n], sl.exp_avg[n]) for n in sl.names)


# ---------------------------------------------------------------------------------------------- refusals


def _bad_checkpoint(runs, tmp_path, case) -> tuple[dict, str]:
    """A copy of a run made bad in one way; returns (checkpoint params, regex the error must match)."""
    src = {"no_state": runs["no_state"], "ended": runs["ended"], "paged": runs["paged"]}.get(case, runs["ok"])
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
        return kw, r"learning rate \(next\) is 0.*last applied lr = 0\.00\d+.*checkpoint\.learning_rate to last or a number"
    if case == "paged":
        return kw, rf"8-bit/paged optimizer state .* for {name0}.*not supported.*adamw_torch"
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


BAD_CASES = ["missing_optimizer", "truncated_optimizer", "other_rank", "nan", "no_state", "no_step", "paged",
             "ended", "three_groups"]


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
    report = (out / verify.REPORT).read_text()
    (out / verify.REPORT).write_text(report.replace('"fingerprint": "', '"fingerprint": "0', 1))
    with pytest.raises(ProbeError, match="does not belong to verify.json.*rerun entropy-probe verify"):
        verify.read_verify(out)
    with pytest.raises(ProbeError, match="not found"):
        verify.read_verify(tmp_path / "nowhere")


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
    assert (tmp_path / "v" / verify.REPORT).exists() and (tmp_path / "v" / verify.STATE).exists()
