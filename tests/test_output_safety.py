"""Output safety: a stage owns only what it writes, refuses an --out that overlaps what it reads, swaps its
output in so that a kill at any step leaves a complete set, runs one at a time per --out, reports a full
disk in one line, writes strict JSON, and honours the umask (docs/design.md, "Output safety")."""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from entropy_probe import files, outputs
from entropy_probe.errors import ProbeError
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` (relative path -> bytes), hidden ones included."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_set(out: Path, tag: str, stage: str = "verify") -> None:
    """A small staged output whose file names and contents depend on `tag`."""
    with outputs.staged_output_dir(out, stage=stage) as tmp:
        files.write_json(tmp / "summary.json", {"tag": tag})
        files.write_text(tmp / "sub" / f"{tag}.txt", tag * 3)


def cli(tmp_path: Path, *args: str, params: dict | None = None):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params or {}))
    return runner.invoke(app, [args[0], "--params", str(params_file), *args[1:]])


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture()
def no_stage_import(monkeypatch):
    """Fail the test if the CLI gets as far as importing a stage module (the refusal must come first)."""

    real_import = importlib.import_module

    def refuse(name, *a, **k):  # libraries' own lazy imports (pydantic's) pass; a stage module does not
        if name.startswith("stages."):
            raise AssertionError(f"stage module {name} imported before the --out was checked")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", refuse)


# ---------------------------------------------------------------------------------------------- 1. ownership


def test_foreign_files_in_out_are_refused_before_any_work_and_kept(tmp_path, no_stage_import):
    out = tmp_path.resolve() / "mine"
    (out / "myrun").mkdir(parents=True)
    (out / "NOTES.md").write_text("my notes")
    (out / "myrun" / "result.csv").write_text("1,2\n")
    before = snapshot(out)
    line = one_error_line(cli(tmp_path, "verify", "--out", str(out)))
    assert f"output dir {out} holds files entropy-probe did not write (NOTES.md; 3 in all)" in line
    assert "choose another --out" in line
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "params.yaml"]


def test_a_stage_replaces_its_own_output_even_after_dvc_removed_some_of_it(tmp_path):
    out = tmp_path / "v"
    write_set(out, "a")
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    assert manifest == {"stage": "verify", "files": ["sub/a.txt", "summary.json"], "dirs": ["sub"]}
    (out / "summary.json").unlink()  # `dvc repro` deletes the declared outs before it runs the stage
    write_set(out, "b")
    assert sorted(snapshot(out)) == [outputs.MANIFEST, "sub/b.txt", "summary.json"]
    first = (out / outputs.MANIFEST).read_bytes()
    write_set(out, "b")
    assert (out / outputs.MANIFEST).read_bytes() == first  # deterministic: DVC's dir hash does not change
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no lock, staging or set-aside dir left


@pytest.mark.parametrize("intruder", ["NOTES.md", "sub/extra.txt", "newdir/"])
def test_an_unlisted_file_in_own_output_is_refused(tmp_path, intruder):
    out = tmp_path / "v"
    write_set(out, "a")
    target = out / intruder.rstrip("/")
    target.mkdir() if intruder.endswith("/") else target.write_text("user's")
    before = snapshot(out)
    with pytest.raises(ProbeError, match=rf"holds files entropy-probe did not write \({intruder.rstrip('/')};"):
        write_set(out, "b")
    assert snapshot(out) == before and target.exists()


def test_another_stages_output_is_refused(tmp_path, no_stage_import):
    out = tmp_path / "s"
    write_set(out, "a", stage="sample-u")
    line = one_error_line(cli(tmp_path, "sample-e", "--out", str(out)))
    assert "holds the output of entropy-probe sample-u, not sample-e" in line
    assert (out / "sub" / "a.txt").exists()


# ---------------------------------------------------------------------------------------------- 2. overlap


def _checkpoint_like(root: Path) -> Path:
    ck = root / "ck"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"weights")
    (ck / "optimizer.pt").write_bytes(b"state")
    return ck


@pytest.mark.parametrize(
    "case", ["is", "inside", "contains", "symlink", "relative", "optimizer_path", "sampling", "probe", "dataset"]
)
def test_out_overlapping_the_checkpoint_is_refused_before_any_work(tmp_path, monkeypatch, no_stage_import, case):
    ck = _checkpoint_like(tmp_path)
    settings = {"checkpoint": {"path": str(ck)}}
    out, relation, key = ck, "is", "checkpoint.path"
    if case == "inside":
        out, relation = ck / "probe_out", "is inside"
    elif case == "contains":
        out, relation = tmp_path, "contains"
    elif case == "symlink":
        (tmp_path / "link").symlink_to(ck)
        out = tmp_path / "link"
    elif case == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path("other/../ck")
    elif case == "optimizer_path":
        settings = {"checkpoint": {"path": str(tmp_path / "elsewhere"), "optimizer_path": str(ck / "optimizer.pt")}}
        relation, key = "contains", "checkpoint.optimizer_path"
    elif case == "sampling":
        settings = {"sampling": {"checkpoint": str(ck)}}
        key = "sampling.checkpoint"
    elif case == "probe":
        settings = {"probe": {"checkpoints": {"step4": str(ck)}}}
        key = "probe.checkpoints.step4"
    elif case == "dataset":
        settings = {"batch_config": {"dataset_name": str(ck / "prompts.jsonl")}}
        (ck / "prompts.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
        relation, key = "contains", "batch_config.dataset_name"
    before = snapshot(ck)
    line = one_error_line(cli(tmp_path, "verify", "--out", str(out), params=settings))
    assert f"output dir {out.resolve()} {relation} {key} (" in line  # symlinks and '..' resolved
    assert "choose an --out apart from the checkpoint" in line
    assert snapshot(ck) == before


@pytest.mark.parametrize(
    "stage, key",
    [
        ("delta-h1", "paths.verify"),
        ("delta-h1", "paths.sample_e"),
        ("delta-h1", "paths.sample_u"),
        ("exact", "paths.delta_h1"),
        ("truth", "paths.sample_e"),
        ("report", "probe.root/step2/delta_h1"),
    ],
)
def test_out_overlapping_an_input_artifact_is_refused(tmp_path, no_stage_import, stage, key):
    params = {
        "paths": {k: str(tmp_path / k) for k in ("verify", "sample_e", "sample_u", "delta_h1")},
        "probe": {"root": str(tmp_path / "probe"), "checkpoints": {"step2": str(tmp_path / "ck")}},
    }
    if stage != "report":
        params["probe"]["checkpoints"] = {}
    artifact = tmp_path / "probe" / "step2" / "delta_h1" if stage == "report" else Path(params["paths"][key[6:]])
    write_set(artifact, "a", stage="whatever")
    before = snapshot(artifact)
    line = one_error_line(cli(tmp_path, stage, "--out", str(artifact / "nested"), params=params))
    assert f"is inside {key} (" in line
    assert snapshot(artifact) == before


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, no_stage_import):
    (tmp_path / "result.txt").write_text("keep me")
    line = one_error_line(cli(tmp_path, "verify", "--out", str(tmp_path / "result.txt")))
    assert "is an existing file" in line and "choose a directory for --out" in line
    assert (tmp_path / "result.txt").read_text() == "keep me"


def test_the_demo_may_write_the_checkpoints_it_creates(tmp_path):
    """demo's --out holds the default checkpoint.path: that is not an overlap for the stage that makes it."""
    result = cli(
        tmp_path,
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--dry-run",
        params={"checkpoint": {"path": str(tmp_path / "demo" / "run" / "checkpoint-6")}},
    )
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------- 3. kill safety

KILLED_RUN = """
import os, sys
from pathlib import Path
from entropy_probe import files, outputs

out, tag, kill_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def before_step(step):
    if step == kill_at:
        if step == "delete_old":  # die half-way through deleting the old set
            next(outputs._trash_path(out.resolve()).rglob("*.txt")).unlink()
        os._exit(9)

outputs._before_step = before_step
with outputs.staged_output_dir(out, stage="verify") as tmp:
    files.write_json(tmp / "summary.json", {"tag": tag})
    if kill_at == "body":
        os._exit(9)
    files.write_text(tmp / "sub" / f"{tag}.txt", tag * 3)
"""


def run_killed(out: Path, tag: str, kill_at: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), tag, kill_at], env=env).returncode


EXPECTED_AFTER_KILL = {  # what the output dir holds once the next run has cleaned up
    "body": "old",
    "manifest": "old",
    "set_aside": "old",
    "rename_in": "old",
    "discard_old": "new",
    "delete_old": "new",
}


@pytest.mark.parametrize("step", list(EXPECTED_AFTER_KILL))
def test_a_kill_at_any_step_leaves_the_complete_old_or_new_set(tmp_path, step):
    assert set(EXPECTED_AFTER_KILL) == {"body", *outputs.SWAP_STEPS}
    sets = {}
    for tag in ("old", "new"):  # reference sets, written without a kill
        write_set(tmp_path / tag, tag)
        sets[tag] = snapshot(tmp_path / tag)
    out = tmp_path / "data" / "x"
    write_set(out, "old")
    assert run_killed(out, "new", step) == 9
    # right after the kill: the old or the new set at `out`, or (between the renames) the old set set aside
    aside = out.parent / ".x.old.tmp"
    held = snapshot(out) if out.exists() else snapshot(aside)
    assert held in (sets["old"], sets["new"]) and (out.exists() or step == "rename_in")
    # the next start cleans up: the expected complete set at `out`, nothing else next to it
    with outputs.claim_output_dir(out, "verify"):
        pass
    assert snapshot(out) == sets[EXPECTED_AFTER_KILL[step]]
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]
    write_set(out, "third")  # and a following run succeeds
    assert sorted(snapshot(out)) == [outputs.MANIFEST, "sub/third.txt", "summary.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]


def test_a_partly_deleted_old_set_is_never_restored(tmp_path):
    """Killed while deleting the old set, then `dvc repro` removed the output: the remains are discarded."""
    out = tmp_path / "x"
    write_set(out, "old")
    assert run_killed(out, "new", "delete_old") == 9
    shutil.rmtree(out)
    with outputs.claim_output_dir(out, "verify"):
        pass
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_leftovers_of_other_names_are_not_touched(tmp_path):
    """Only this output's own staging names are cleaned up: a sibling's or a user's lookalike stays."""
    for name in (".y.abcd1234.tmp", ".x.backup.tmp", ".x.abcd12345.tmp", ".x.user0000.tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / ".x.user0000.tmp" / "mine.txt").write_text("a user's dir with a staging-like name")
    (tmp_path / ".x.abcd1234.tmp").mkdir()  # a staging dir of x (a killed run): it carries our manifest
    (tmp_path / ".x.abcd1234.tmp" / outputs.MANIFEST).write_text('{"stage": null, "files": [], "dirs": []}')
    write_set(tmp_path / "x", "a")
    kept = [".x.abcd12345.tmp", ".x.backup.tmp", ".x.user0000.tmp", ".y.abcd1234.tmp", "x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_a_users_dir_with_a_set_aside_name_is_kept_and_refused(tmp_path):
    """A dir named like a set-aside output but without our manifest is the user's: not deleted, not renamed."""
    write_set(tmp_path / "x", "a")
    lookalike = tmp_path / ".x.old.tmp"
    (lookalike / "precious").mkdir(parents=True)
    with pytest.raises(ProbeError, match=r"\.x\.old\.tmp .*not written by entropy-probe.*move it away"):
        with outputs.claim_output_dir(tmp_path / "x", "verify"):
            pass
    assert (lookalike / "precious").is_dir() and (tmp_path / "x").is_dir()


def test_a_corrupt_manifest_is_one_line(tmp_path):
    out = tmp_path / "x"
    write_set(out, "a")
    (out / outputs.MANIFEST).write_text('{"files": [{}], "dirs": []}')
    with pytest.raises(ProbeError, match="not an entropy-probe manifest"):
        with outputs.claim_output_dir(out, "verify"):
            pass


def test_the_working_directory_is_refused_as_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", ".."):
        with pytest.raises(ProbeError, match="working directory"):
            outputs.check_output_dir(out, {})


# ---------------------------------------------------------------------------------------------- 4. one run at a time

HOLD_LOCK = """
import sys, time
from entropy_probe import files, outputs
with outputs.claim_output_dir(sys.argv[1], "verify"):
    print("locked", flush=True)
    time.sleep(3600)  # until the test kills it
"""


def test_a_second_run_into_the_same_out_is_refused_in_one_line(tmp_path, no_stage_import):
    out = tmp_path.resolve() / "v"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_error_line(cli(tmp_path, "verify", "--out", str(out)))
        assert line == (
            f"entropy-probe verify: error: another entropy-probe run is writing {out} — "
            "wait for it or choose another --out"
        )
        with pytest.raises(ProbeError, match="another entropy-probe run is writing"):
            write_set(out, "a")
    finally:
        holder.kill()
        holder.wait()
    write_set(out, "a")  # the lock dies with its holder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "v"]


# ---------------------------------------------------------------------------------------------- 5. disk full


def _fail(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize("where", ["write_json", "write_tensors", "foreign_writer", "rename_in"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_is_one_line_and_leaves_the_old_output(tmp_path, monkeypatch, where, code):
    out = tmp_path.resolve() / "v"
    write_set(out, "old")
    old = snapshot(out)
    real_rename = os.rename

    def rename_fails_for_staging(src, dst):
        if re.fullmatch(r"\.v\.[a-z0-9_]{8}\.tmp", Path(src).name):  # only renaming the new set in
            raise OSError(code, os.strerror(code))
        real_rename(src, dst)

    with pytest.raises(ProbeError) as err:
        with outputs.staged_output_dir(out, stage="verify") as tmp:
            files.write_text(tmp / "first.txt", "written before the disk filled up")
            if where == "write_json":
                monkeypatch.setattr(Path, "write_text", _fail(code))
                files.write_json(tmp / "summary.json", {"tag": "new"})
            elif where == "write_tensors":
                monkeypatch.setattr(Path, "write_bytes", _fail(code))
                files.write_tensors(tmp / "state.safetensors", {"x": torch.zeros(3)}, kind="k")
            elif where == "foreign_writer":  # e.g. savefig or the Trainer writing into the staging dir
                raise OSError(code, os.strerror(code), str(tmp / "plot.png"))
            else:
                monkeypatch.setattr(os, "rename", rename_fails_for_staging)
    monkeypatch.undo()
    message = str(err.value)
    named = {
        "write_json": out / "summary.json",
        "write_tensors": out / "state.safetensors",
        "foreign_writer": out / "plot.png",
        "rename_in": out,
    }[where]
    fix = "free space" if code == errno.ENOSPC else "make it writable"
    assert message == f"cannot write {named}: {os.strerror(code)} — {fix} or choose another --out"
    assert snapshot(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_an_unrelated_os_error_is_not_disguised(tmp_path):
    """Only write failures become 'cannot write': anything else keeps its own traceback."""
    with pytest.raises(FileNotFoundError):
        with outputs.staged_output_dir(tmp_path / "v", stage="verify"):
            open(tmp_path / "missing-input.json")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 6. strict JSON


def _strict_loads(text: str):
    def refuse(constant):
        raise AssertionError(f"non-strict JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"targets": {"sequence": {"se_E": float("nan")}}}, "targets.sequence.se_E"),
        ({"etas": [{"ratio": 1.0}, {"ratio": float("-inf")}]}, "etas[1].ratio"),
        ({"a": 1, "b": (0.5, torch.tensor(float("inf")))}, "b[1]"),
    ],
)
def test_write_json_refuses_non_finite_values_naming_the_key(tmp_path, obj, where):
    with pytest.raises(ProbeError, match="^" + re.escape(f"delta_h1.json: non-finite value at {where} — ")):
        files.write_json(tmp_path / "delta_h1.json", obj)
    assert list(tmp_path.iterdir()) == []


def test_tensor_metadata_is_strict_json_too(tmp_path):
    with pytest.raises(ProbeError, match=r"^b\.safetensors metadata: non-finite value at learning_rate"):
        files.write_tensors(tmp_path / "b.safetensors", {"x": torch.zeros(1)}, "bars", {"learning_rate": math.inf})
    assert list(tmp_path.iterdir()) == []


def test_finite_json_is_strict_and_round_trips(tmp_path):
    obj = {"x": 1e-300, "y": [-2.5, 3], "z": torch.tensor(0.25), "p": Path("a/b"), "n": None}
    files.write_json(tmp_path / "r.json", obj)
    assert _strict_loads((tmp_path / "r.json").read_text()) == {**obj, "z": 0.25, "p": "a/b"}


# ---------------------------------------------------------------------------------------------- 7. umask

UMASK_RUN = """
import os, sys
os.umask(int(sys.argv[2], 8))  # before the import: files reads the umask once
from pathlib import Path
import torch
from entropy_probe import files, outputs
with outputs.staged_output_dir(Path(sys.argv[1]), stage="verify") as tmp:
    files.write_json(tmp / "a.json", {"a": 1})
    files.write_text(tmp / "sub" / "b.txt", "b")
    files.write_tensors(tmp / "c.safetensors", {"x": torch.zeros(2)}, kind="k")
"""


@pytest.mark.parametrize("umask, dir_mode, file_mode", [("022", 0o755, 0o644), ("027", 0o750, 0o640)])
def test_outputs_honour_the_umask(tmp_path, umask, dir_mode, file_mode):
    out = tmp_path / "v"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", UMASK_RUN, str(out), umask], env=env, check=True)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {
        ".": dir_mode,
        "sub": dir_mode,
        "a.json": file_mode,
        "sub/b.txt": file_mode,
        "c.safetensors": file_mode,
        outputs.MANIFEST: file_mode,
    }


# ---------------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def checkpoint(trainer_checkpoint):
    return trainer_checkpoint(steps=2, total_steps=4, hidden_size=32)  # shared: read only


def test_verify_cli_replaces_its_own_output_and_keeps_the_users(checkpoint, tmp_path):
    params = {"checkpoint": {"path": str(checkpoint), "dtype": "fp32", "device_map": "cpu", "trust_pickles": True}}
    out = tmp_path / "v"
    assert cli(tmp_path, "verify", "--out", str(out), params=params).exit_code == 0
    first = snapshot(out)
    assert json.loads(first[outputs.MANIFEST])["files"] == sorted(k for k in first if k != outputs.MANIFEST)
    (out / "verify.json").unlink()  # as `dvc repro` does: the declared outs go, the manifest stays
    assert cli(tmp_path, "verify", "--out", str(out), params=params).exit_code == 0
    assert sorted(snapshot(out)) == sorted(first)
    (out / "NOTES.md").write_text("mine")
    line = one_error_line(cli(tmp_path, "verify", "--out", str(out), params=params))
    assert "holds files entropy-probe did not write (NOTES.md; 1 in all)" in line
    assert (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "v"]
