"""The `report` stage on hand-made per-checkpoint artifacts: table values vs inputs, plot CSVs, PNGs,
missing-input errors that write nothing, dry-run, and the single-run fallback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from artifact_builders import delta_h1_json, truth_json, verify_json
from PIL import Image

from entropy_probe import reporting
from entropy_probe.artifacts.exact import ExactReport
from entropy_probe.artifacts.report import CheckpointMetrics, Report
from entropy_probe.errors import ProbeError
from entropy_probe.estimators import TARGETS
from entropy_probe.params import Params
from stages import report as report_stage

TARGET = "token_mean"
DASH = "–"


def delta_h1_body(i: int, reuse: dict | None) -> dict:
    """A delta_h1.json with distinct, recognisable numbers for checkpoint i."""
    d = -1.25e-3 * (i + 1)
    numbers = {
        "delta_h1": d,
        "se_delta_h1": 4.0e-4 * (i + 1),
        "se_E": 3.0e-4 * (i + 1),
        "se_U": 2.5e-4,
        "entropy": 0.8 - 0.1 * i,
        "learning_rate": 2e-3 / (i + 1),
        "delta_h1_gradient_part": -1.5e-3 * (i + 1),
        "delta_h1_momentum_part": 2.5e-4 * (i + 1),
        "delta_h1_naive": -4.5e-3,
        "cov_logp_advantage": 0.2 + i,
    }
    if reuse is not None:
        reuse = {**reuse, "sampler_fingerprint": {"E": "fp0", "U": "fp0"}}
    targets = {TARGET: {"delta_h1": d * (1 + 1e-7), "se_E": numbers["se_E"], "entropy": numbers["entropy"]}}
    return delta_h1_json(TARGET, targets, reuse, **numbers)  # last-bit noise on the target's δH₁, as in real runs


def exact_json(dh: dict, multipliers: list[float]) -> dict:
    """A complete exact.json (`ExactReport`) whose configured target's exact δH₁ is δH₁ + SE_E / 2 (z = −0.5)."""
    ex = dh["delta_h1"] + 0.5 * dh["se_E"]  # z = −0.5
    d1 = dh["targets"][TARGET]["delta_h1"]
    grid = [
        {
            "multiplier": m,
            "eta": m * dh["learning_rate"],
            "delta_h_exact": m * ex + 1e-4 * m * m,
            "delta_h1_exact_linear": m * ex,
            "delta_h1_linear": m * d1,
        }
        for m in multipliers
    ]
    target = {
        "entropy_exact": dh["entropy"],
        "entropy_estimate": dh["entropy"],
        "delta_h1_exact": ex,
        "delta_h1": d1,
        "se_E": dh["se_E"],
        "se_delta_h1": dh["se_delta_h1"],
        "z": (dh["delta_h1"] - ex) / dh["se_E"],
        "fd_slope": ex,
        "rel_err_fd": 1e-9,
        "eta_grid": grid,
    }
    return ExactReport.model_validate(
        {
            "configured_target": TARGET,
            "targets": {t: target for t in TARGETS},
            "learning_rate": dh["learning_rate"],
            "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 3, "eos_id": [14]},
            "checkpoint_fingerprint": "fp",
            "dtype": "float64",
            "fd_step": 1e-3,
            "n_distinct_prompts": 4,
            "n_e_rows": 8,
            "n_sequences": 100,
            "n_parameters": 640,
        }
    ).model_dump(mode="json")


def truth_body(dh: dict, fresh: bool) -> dict:
    lr, d1 = dh["learning_rate"], dh["delta_h1"]
    etas = []
    for m in (0.5, 1.0, 2.0):
        snis = {"delta_h": 0.9 * m * d1, "se": 1e-4 * m, "ess": 100.0, "ess_fraction": 0.97 - 0.01 * m}
        etas.append(
            {
                "multiplier": m,
                "eta": m * lr,
                "delta_h1_pred": m * d1,
                "snis": snis,
                "fresh": {"delta_h": 1.1 * m * d1, "se": 2e-4 * m} if fresh else None,
                "ratio_snis": 0.9,
                "ratio_fresh": 1.1 if fresh else None,
            }
        )
    linearity = {
        "delta_h1": d1,
        "slope_snis": 0.9 * d1,
        "curvature_snis": 0.0,
        "slope_fresh": 1.1 * d1 if fresh else None,
        "curvature_fresh": None,
    }
    return truth_json(
        target=TARGET, learning_rate=lr, delta_h1=d1, se_delta_h1=dh["se_delta_h1"], etas=etas, linearity=linearity
    )


ATTRIBUTIONS = [  # batch, index, prompt_index, contribution, prompt, responses
    ("U", 1, 93, -7.5e-4, "9+3=", "'12'→1 | '13'→0"),
    ("U", 3, 99, -4.0e-5, 'say "a, b"', "'x'→0 | 'y'→1"),  # comma and quotes: CSV quoting round trip
    ("U", 2, 45, -1.5e-4, "4+5=", "'9'→1 | '8'→0"),
    ("U", 6, 65, 0.0, "6+5=", "'11'→1 | '11'→1"),
    ("U", 4, 85, 1.9e-4, "8+5=", "'13'→1 | '12'→0"),
    ("E", 2, 38, -9.0e-3, "3+8=", "'11'"),  # an E row, more negative than any U group: must not be listed
]


def write_checkpoint(base: Path, i: int, *, reuse=None, exact=None, truth=None, step=None) -> dict:
    """<base>/{verify,delta_h1,exact,truth}/ for checkpoint i; returns what was written."""
    dh = delta_h1_body(i, reuse)
    written = {"delta_h1": dh, "step": step if step is not None else 2 * (i + 1)}
    for sub in ("verify", "delta_h1"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    verify = verify_json(written["step"], dh["learning_rate"], f"fp{i}")
    (base / "verify" / "verify.json").write_text(json.dumps(verify))
    (base / "delta_h1" / "delta_h1.json").write_text(json.dumps(dh))
    with open(base / "delta_h1" / "attributions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch", "index", "prompt_index", "contribution", "prompt", "responses"])
        w.writerows(ATTRIBUTIONS)
    if exact is not None:
        written["exact"] = exact_json(dh, exact)
        (base / "exact").mkdir(exist_ok=True)
        (base / "exact" / "exact.json").write_text(json.dumps(written["exact"]))
    if truth is not None:
        written["truth"] = truth_body(dh, fresh=truth == "fresh")
        (base / "truth").mkdir(exist_ok=True)
        (base / "truth" / "truth.json").write_text(json.dumps(written["truth"]))
    return written


def sweep_params(root: Path, names: list[str]) -> Params:
    return Params.model_validate(
        {
            "probe": {"root": str(root), "checkpoints": [{"name": n, "path": f"run/{n}"} for n in names]},
            "truth": {"eta_multipliers": [0.5, 1.0, 3.0]},
        }
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three checkpoints: a (plain, no exact/truth), b (reused samples, exact), c (reused, exact + truth)."""
    root = tmp_path_factory.mktemp("probe")
    written = {
        "a": write_checkpoint(root / "a", 0),
        "b": write_checkpoint(
            root / "b",
            1,
            reuse={"ess_fraction_E": 0.81, "ess_fraction_U": 0.67, "weighted": True},
            exact=[0.25, 1.0, 4.0],
        ),
        "c": write_checkpoint(
            root / "c",
            2,
            reuse={"ess_fraction_E": 0.55, "ess_fraction_U": 0.5, "weighted": True},
            exact=[1.0, 2.0, 8.0],
            truth="fresh",
        ),
    }
    out = root.parent / "report_out"
    params = sweep_params(root, ["a", "b", "c"])
    result = report_stage.run(params, out, dry_run=False)
    return {"root": root, "out": out, "written": written, "result": result, "params": params}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(md: str) -> dict[str, dict[str, str]]:
    """The markdown table as {checkpoint: {header: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def parse_pm(cell: str) -> tuple[float, float]:
    x, se = cell.split("±")
    return float(x), float(se)


def close(a: float, b: float, rel: float = 5e-3) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def test_report_json_numbers_match_inputs(sweep):
    res = json.loads((sweep["out"] / "report.json").read_text())
    assert res == Report.read(sweep["out"]).model_dump(mode="json")  # written through the contract
    assert res["target"] == TARGET and list(res["checkpoints"]) == ["a", "b", "c"]
    for name, w in sweep["written"].items():
        row, dh = res["checkpoints"][name], w["delta_h1"]
        assert row["step"] == w["step"]
        for k in reporting.DELTA_H1_KEYS:
            assert row[k] == dh[k], (name, k)
        if "exact" in w:
            ex = w["exact"]["targets"][TARGET]["delta_h1_exact"]
            assert row["exact_delta_h1"] == ex
            assert row["exact_z"] == pytest.approx(-0.5, rel=1e-9)  # built as δH₁ + 0.5 SE_E
        else:
            assert row["exact_delta_h1"] is None and row["exact_z"] is None
    a, b, c = (res["checkpoints"][n] for n in "abc")
    assert a["ess_fraction_E"] is None and b["ess_fraction_E"] == 0.81 and b["ess_fraction_U"] == 0.67
    m1 = next(e for e in sweep["written"]["c"]["truth"]["etas"] if e["multiplier"] == 1.0)
    assert c["truth_snis"] == m1["snis"]["delta_h"] and c["truth_snis_se"] == m1["snis"]["se"]
    assert c["truth_fresh"] == m1["fresh"]["delta_h"] and c["truth_fresh_se"] == m1["fresh"]["se"]
    assert c["ratio_snis"] == pytest.approx(0.9) and c["ratio_fresh"] == pytest.approx(1.1)
    assert c["truth_snis_ess_fraction"] == m1["snis"]["ess_fraction"]
    assert b["truth_snis"] is None and b["ratio_snis"] is None


def test_markdown_table_shows_inputs_and_dashes(sweep):
    md = (sweep["out"] / "report.md").read_text()
    rows = table_rows(md)
    assert list(rows) == ["a", "b", "c"]
    for name, w in sweep["written"].items():
        r, dh = rows[name], w["delta_h1"]
        x, se = parse_pm(r["δH₁ ± SE"])
        assert close(x, dh["delta_h1"]) and close(se, dh["se_delta_h1"])
        assert close(float(r["H"]), dh["entropy"]) and close(float(r["lr"]), dh["learning_rate"])
        assert close(float(r["gradient part"]), dh["delta_h1_gradient_part"])
        assert close(float(r["momentum part"]), dh["delta_h1_momentum_part"])
        assert close(float(r["naive δH₁"]), dh["delta_h1_naive"])
        assert close(float(r["Cov(log π, A)"]), dh["cov_logp_advantage"])
        assert r["step"] == str(w["step"])
    optional = ("ESS/N (E, U)", "exact δH₁", "z", "ΔH(lr) SNIS ± SE", "ΔH(lr) fresh ± SE", "ΔH/δH₁ (SNIS, fresh)")
    assert [rows["a"][h] for h in optional] == [DASH] * len(optional)
    assert [float(v) for v in rows["b"]["ESS/N (E, U)"].split(",")] == [0.81, 0.67]
    # no population value in this exact.json: exact over the drawn E prompts, marked *
    assert rows["b"]["exact δH₁"].endswith("*")
    exact_b = float(rows["b"]["exact δH₁"].rstrip("*"))
    assert close(exact_b, sweep["written"]["b"]["exact"]["targets"][TARGET]["delta_h1_exact"])
    assert float(rows["b"]["z"]) == -0.5 and rows["b"]["ΔH(lr) SNIS ± SE"] == DASH
    snis, snis_se = parse_pm(rows["c"]["ΔH(lr) SNIS ± SE"])
    d1c = sweep["written"]["c"]["delta_h1"]["delta_h1"]
    assert close(snis, 0.9 * d1c) and close(snis_se, 1e-4)
    assert [float(v) for v in rows["c"]["ΔH/δH₁ (SNIS, fresh)"].split(",")] == [0.9, 1.1]
    # the dashes of absent outputs are said to be absent, per checkpoint (c has both)
    note = next(line for line in md.splitlines() if line.startswith(f"{DASH}: not computed."))
    assert "a has no exact and no truth output; b has no truth output (" in note and "c has" not in note
    # the top-U list is the last checkpoint's, U groups only, most negative first
    listed = md.split("## Top entropy-lowering U groups (c)")[1]
    assert listed.index("9+3=") < listed.index("4+5=") < listed.index('say "a, b"')
    assert "3+8=" not in listed and "6+5=" not in listed and "8+5=" not in listed
    # the stage's result (which the CLI prints) is the same markdown
    assert sweep["result"] + "\n" == md


def test_plot_csvs(sweep):
    plots = sweep["out"] / "plots"
    dh1 = read_csv(plots / "delta_h1.csv")
    assert [r["checkpoint"] for r in dh1] == ["a", "b", "c"]
    for r in dh1:
        w = sweep["written"][r["checkpoint"]]
        d, se = w["delta_h1"]["delta_h1"], w["delta_h1"]["se_delta_h1"]
        assert int(r["step"]) == w["step"] and float(r["delta_h1"]) == d and float(r["se"]) == se
        assert float(r["lo"]) == pytest.approx(d - 2 * se) and float(r["hi"]) == pytest.approx(d + 2 * se)
        assert (r["exact"] == "") == ("exact" not in w)

    eta = read_csv(plots / "delta_h_eta.csv")
    by = {n: [r for r in eta if r["checkpoint"] == n] for n in "abc"}
    assert [float(r["multiplier"]) for r in by["a"]] == [0.5, 1.0, 3.0]  # params.truth grid: no exact/truth
    assert [float(r["multiplier"]) for r in by["b"]] == [0.25, 1.0, 4.0]  # exact's grid
    assert [float(r["multiplier"]) for r in by["c"]] == [0.5, 1.0, 2.0, 8.0]  # union of truth's and exact's
    for n, rows in by.items():
        dh = sweep["written"][n]["delta_h1"]
        for r in rows:
            m = float(r["multiplier"])
            assert float(r["eta"]) == pytest.approx(m * dh["learning_rate"])
            assert float(r["delta_h1_pred"]) == pytest.approx(m * dh["delta_h1"])
    assert all(r["truth_snis"] == r["truth_fresh"] == r["exact"] == "" for r in by["a"])
    truth_c = {e["multiplier"]: e for e in sweep["written"]["c"]["truth"]["etas"]}
    exact_c = {g["multiplier"]: g for g in sweep["written"]["c"]["exact"]["targets"][TARGET]["eta_grid"]}
    for r in by["c"]:
        m = float(r["multiplier"])
        t, e = truth_c.get(m), exact_c.get(m)
        assert (r["truth_snis"] == "") == (t is None) and (r["exact"] == "") == (e is None)
        if t is not None:
            assert float(r["truth_snis"]) == t["snis"]["delta_h"] and float(r["truth_snis_se"]) == t["snis"]["se"]
            assert float(r["truth_fresh"]) == t["fresh"]["delta_h"] and float(r["truth_fresh_se"]) == t["fresh"]["se"]
        if e is not None:
            assert float(r["exact"]) == e["delta_h_exact"]

    top = read_csv(plots / "top_u.csv")
    expected = sorted((a for a in ATTRIBUTIONS if a[0] == "U" and a[3] < 0), key=lambda a: a[3])
    assert [int(r["rank"]) for r in top] == [1, 2, 3]
    assert [(float(r["contribution"]), r["prompt"], r["responses"]) for r in top] == [
        (a[3], a[4], a[5]) for a in expected
    ]


def test_pngs_are_valid_images(sweep):
    for name in ("delta_h1_by_checkpoint.png", "delta_h_vs_eta.png", "top_u.png"):
        path = sweep["out"] / name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 300
            assert len(set(im.convert("L").getdata())) > 10  # something was drawn


def test_missing_delta_h1_names_checkpoint_and_writes_nothing(tmp_path):
    root = tmp_path / "probe"
    write_checkpoint(root / "first", 0)
    write_checkpoint(root / "second", 1)
    (root / "second" / "delta_h1" / "delta_h1.json").unlink()
    out = tmp_path / "reports" / "report"
    with pytest.raises(ProbeError, match=r"checkpoint 'second' has no delta_h1\.json.*dvc repro"):
        report_stage.run(sweep_params(root, ["first", "second"]), out, dry_run=False)
    assert not out.parent.exists()  # not even the parent (nor a staging dir in it)


def test_stale_exact_or_truth_is_refused(tmp_path):
    root = tmp_path / "probe"
    write_checkpoint(root / "x", 0, exact=[1.0], truth="snis")
    path = root / "x" / "exact" / "exact.json"
    ex = json.loads(path.read_text())
    ex["targets"][TARGET]["delta_h1"] *= 1.5  # computed from another δH₁ run
    path.write_text(json.dumps(ex))
    with pytest.raises(ProbeError, match=r"exact\.json of checkpoint 'x'.*stale"):
        report_stage.run(sweep_params(root, ["x"]), tmp_path / "out", dry_run=False)
    path.unlink()
    tpath = root / "x" / "truth" / "truth.json"
    tr = json.loads(tpath.read_text())
    tr["target"] = "sequence"
    tpath.write_text(json.dumps(tr))
    with pytest.raises(ProbeError, match=r"truth\.json of checkpoint 'x' is for target 'sequence'"):
        report_stage.run(sweep_params(root, ["x"]), tmp_path / "out", dry_run=False)
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_inputs_and_writes_nothing(tmp_path):
    root = tmp_path / "probe"
    write_checkpoint(root / "a", 0, exact=[1.0])
    out = tmp_path / "out"
    printed = report_stage.run(sweep_params(root, ["a", "b"]), out, dry_run=True) + "\n"
    assert printed.startswith("report plan:")
    assert str(root / "a" / "delta_h1" / "delta_h1.json") in printed
    assert f"{root / 'b' / 'delta_h1' / 'delta_h1.json'} [required]  (missing)" in printed
    assert f"{root / 'a' / 'exact' / 'exact.json'} [optional]\n" in printed
    assert str(root / "b" / "delta_h1" / "attributions.csv") in printed  # the last checkpoint's top-U source
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_single_run_fallback_uses_paths_and_checkpoint_name(tmp_path):
    write_checkpoint(tmp_path / "single", 0, truth="snis")
    s = tmp_path / "single"
    params = Params.model_validate(
        {
            "checkpoint": {"path": "data/demo/run/checkpoint-6"},
            "paths": {
                "verify": str(s / "verify"),
                "delta_h1": str(s / "delta_h1"),
                "exact": str(s / "exact"),
                "truth": str(s / "truth"),
            },
        }
    )
    report_stage.run(params, tmp_path / "out", dry_run=False)
    res = Report.read(tmp_path / "out")
    assert list(res.checkpoints) == ["checkpoint-6"]
    row = res.checkpoints["checkpoint-6"]
    assert row.truth_fresh is None and row.ratio_fresh is None and row.ratio_snis == pytest.approx(0.9)
    assert CheckpointMetrics.read(tmp_path / "out", "checkpoint-6").truth_ratio_snis == row.ratio_snis
    md = table_rows((tmp_path / "out" / "report.md").read_text())["checkpoint-6"]
    assert md["ΔH(lr) fresh ± SE"] == DASH and md["exact δH₁"] == DASH
    assert [v.strip() for v in md["ΔH/δH₁ (SNIS, fresh)"].split(",")] == ["0.90", DASH]


def test_cli_exit_code_2_on_missing_input(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    (tmp_path / "params.yaml").write_text(
        f"probe:\n  root: {tmp_path / 'probe'}\n  checkpoints:\n    - {{name: gone, path: run/gone}}\n"
    )
    result = CliRunner().invoke(
        app, ["report", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "checkpoint 'gone' has no" in result.output


def test_compact_metrics_one_small_file_per_checkpoint(sweep):
    """metrics/<name>.json: only the numbers DVC tracks, equal to report.json's (`dvc metrics show` stays narrow)."""
    metrics_dir = sweep["out"] / CheckpointMetrics.DIR
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["a.json", "b.json", "c.json"]
    rows = Report.read(sweep["out"]).checkpoints
    for name, row in rows.items():
        raw = json.loads((metrics_dir / f"{name}.json").read_text())
        assert list(raw) == [
            "delta_h1",
            "se_delta_h1",
            "exact_z",
            "ess_fraction_E",
            "ess_fraction_U",
            "truth_ratio_snis",
            "truth_ratio_fresh",
        ]
        assert raw == {
            "delta_h1": row.delta_h1,
            "se_delta_h1": row.se_delta_h1,
            "exact_z": row.exact_z if row.exact_scope == "population" else None,
            "ess_fraction_E": row.ess_fraction_E,
            "ess_fraction_U": row.ess_fraction_U,
            "truth_ratio_snis": row.ratio_snis,
            "truth_ratio_fresh": row.ratio_fresh,
        }
        assert CheckpointMetrics.read(sweep["out"], name) == CheckpointMetrics.model_validate(raw)
    c = json.loads((metrics_dir / "c.json").read_text())
    assert c["truth_ratio_snis"] == pytest.approx(0.9) and c["truth_ratio_fresh"] == pytest.approx(1.1)
    # c's exact.json has no population value: its (under-dispersed) drawn-E z is in the table, not a metric
    assert c["exact_z"] is None and c["ess_fraction_E"] == 0.55
    a = json.loads((metrics_dir / "a.json").read_text())
    assert a["exact_z"] is a["ess_fraction_E"] is a["truth_ratio_snis"] is None  # no exact, truth or reuse


def test_report_contracts_round_trip_and_refuse_malformed(sweep, tmp_path):
    report = Report.read(sweep["out"])
    report.write(tmp_path)
    assert (tmp_path / "report.json").read_text() == (sweep["out"] / "report.json").read_text()
    raw = json.loads((sweep["out"] / "report.json").read_text())
    raw["checkpoints"]["b"]["exact_zz"] = raw["checkpoints"]["b"].pop("exact_z")  # a renamed key
    (tmp_path / "report.json").write_text(json.dumps(raw))
    with pytest.raises(ProbeError, match=r"report\.json is not a valid .*checkpoints\.b\.exact_z.*rerun the report"):
        Report.read(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "b.json").write_text(json.dumps({"delta_h1": "small", "se_delta_h1": 1.0}))
    with pytest.raises(ProbeError, match=r"metrics/b\.json is not a valid b\.json .*delta_h1.*rerun the report stage"):
        CheckpointMetrics.read(tmp_path, "b")


def test_malformed_exact_json_is_one_line_naming_the_stage(tmp_path):
    root = tmp_path / "probe"
    write_checkpoint(root / "x", 0, exact=[1.0])
    path = root / "x" / "exact" / "exact.json"
    ex = json.loads(path.read_text())
    del ex["targets"]["sequence"]
    path.write_text(json.dumps(ex))
    with pytest.raises(ProbeError) as err:
        report_stage.run(sweep_params(root, ["x"]), tmp_path / "out", dry_run=False)
    assert str(path) in str(err.value) and "rerun the exact stage" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_name_must_be_a_file_name(tmp_path):
    with pytest.raises(ProbeError, match=r"probe\.checkpoints has the name 'x/y'"):
        report_stage.run(sweep_params(tmp_path, ["a", "x/y"]), tmp_path / "out", dry_run=True)


def test_cli_prints_the_table_once(sweep, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    names = "".join(f"    - {{name: {n}, path: run/{n}}}\n" for n in "abc")
    (tmp_path / "params.yaml").write_text(f"probe:\n  root: {sweep['root']}\n  checkpoints:\n{names}")
    args = ["report", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == (sweep["out"] / "report.md").read_text()


def test_population_exact_value_is_preferred_and_labelled(tmp_path):
    """With the population value in exact.json the row uses it (the calibrated z); without it, the drawn-E value
    marked '*' in the table (its z is under-dispersed, docs/math.md §7.4)."""
    base = tmp_path / "one"
    written = write_checkpoint(base, 0, exact=[1.0])
    exact = written["exact"]
    for t in TARGETS:  # a population value 1 SE_E above δH₁: z_population = −1
        e = exact["targets"][t]
        e.update(delta_h1_exact_population=e["delta_h1"] + e["se_E"], z_population=-1.0)
    (base / "exact" / "exact.json").write_text(json.dumps(exact))
    from entropy_probe.artifacts.delta_h1 import DeltaH1Report
    from entropy_probe.artifacts.verify import VerifyReport

    verify, delta_h1 = VerifyReport.read(base / "verify"), DeltaH1Report.read(base / "delta_h1")
    row = reporting.checkpoint_probe("one", verify, delta_h1, ExactReport.read(base / "exact"), None, [1.0]).row
    assert row.exact_scope == "population" and row.exact_z == -1.0
    assert row.exact_delta_h1 == exact["targets"][TARGET]["delta_h1_exact_population"]
    assert not reporting.table_cells("one", row)[10].endswith("*")


def test_top_u_groups_rank_by_leave_one_group_out_where_delta_h1_wrote_it(tmp_path):
    """Under gradient clipping the linearised U attributions are ~0: the report ranks by contribution_loo when the
    column holds a value (delta-h1 kept the group gradients), else by the linearised contribution."""
    from stages.report import read_u_groups

    path = tmp_path / "attributions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch", "index", "prompt_index", "contribution", "prompt", "responses", "contribution_loo"])
        w.writerows([["U", 0, 3, -1e-9, "1+1=", "'2'→1", -0.02], ["U", 1, 4, -2e-9, "2+2=", "'4'→1", 0.01]])
        w.writerow(["U", 2, 5, -0.5, "3+3=", "'6'→1", ""])
    groups = read_u_groups(path, "c")
    assert [g.contribution for g in groups] == [-0.02, 0.01, -0.5]
    assert [g.prompt for g in reporting.top_u_groups(groups)] == ["3+3=", "1+1="]
