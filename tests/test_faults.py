"""Faults and hostile inputs, second round (issue 23): signals during the output swap, full disks and file
size limits, an --out that is a mount point, odd --out paths, a "next" checkpoint that is not the next step
of the same run, a swapped trainer-settings file, an absurd stored learning rate, a pickle in the base model,
reward functions that cannot be or fail, library noise, and -S settings a stage does not read."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from entropy_probe import files, outputs
from entropy_probe.checkpoint import checkpoint_fingerprint, resolve_paths
from entropy_probe.errors import ProbeError
from entropy_probe.observed import check_next_checkpoint
from entropy_probe.params import CheckpointParams, validate_params
from stages.cli import app, unread_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_set(out: Path, tag: str) -> None:
    with outputs.staged_output_dir(out, stage="verify") as tmp:
        files.write_json(tmp / "summary.json", {"tag": tag})
        files.write_text(tmp / "sub" / f"{tag}.txt", tag * 3)


def reference_sets(root: Path) -> dict[str, dict[str, bytes]]:
    sets = {}
    for tag in ("old", "new"):
        write_set(root / "ref" / tag, tag)
        sets[tag] = snapshot(root / "ref" / tag)
    return sets


def one_error_line(stderr: str, returncode: int) -> str:
    """The one error line (progress lines aside), no traceback, exit code 2."""
    lines = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert returncode == 2 and len(lines) == 1, stderr
    assert " — " in lines[0]  # problem — fix
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------------------------- 1. signals

INTERRUPTED_RUN = """
import errno, os, signal, sys
from pathlib import Path
from entropy_probe import files, outputs

out, tag, at, how, busy = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "busy"

if busy:  # the dir itself cannot move, as for a mount point: rename(out, ...) fails with EBUSY
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == out.resolve():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real_rename(src, dst)

    os.rename = rename


def hit():
    if how == "kill":
        os._exit(9)
    os.kill(os.getpid(), getattr(signal, how))  # SIGINT (Ctrl-C) or SIGTERM, to this process


outputs._before_step = lambda step: hit() if step == at else None
with outputs.staged_output_dir(out, stage="verify") as tmp:
    files.write_json(tmp / "summary.json", {"tag": tag})
    if at == "body":
        hit()
    files.write_text(tmp / "sub" / f"{tag}.txt", tag * 3)
"""


def run_interrupted(out: Path, at: str, how: str, busy: bool = False) -> int:
    args = [sys.executable, "-c", INTERRUPTED_RUN, str(out), "new", at, how, "busy" if busy else "plain"]
    return subprocess.run(args, env=ENV, capture_output=True).returncode


RETURN_CODES = {"SIGINT": -signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM, "kill": 9}
# a signal held back during the renames takes effect after them: the new set is in
AFTER_SIGNAL = {"body": "old", "manifest": "old", "set_aside": "new", "rename_in": "new", "discard_old": "new"}


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("step", [*AFTER_SIGNAL, "delete_old"])
def test_a_signal_at_any_step_leaves_a_complete_set_and_no_staging_dir(tmp_path, step, how):
    sets = reference_sets(tmp_path)
    out = tmp_path / "data" / "x"
    write_set(out, "old")
    assert run_interrupted(out, step, how) == RETURN_CODES[how]
    # right after the signal, without any cleanup: a complete set at out; the staging dir and the lock are
    # gone (SIGTERM raised like Ctrl-C, so the `finally` blocks ran)
    assert snapshot(out) == sets[AFTER_SIGNAL.get(step, "new")]
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == ["x"] or (step == "delete_old" and left == [".x.trash.tmp", "x"]), left
    with outputs.claim_output_dir(out, "verify"):
        pass
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]


def test_without_the_deferral_ctrl_c_between_the_renames_would_lose_both_sets(tmp_path, monkeypatch):
    """The property above is not vacuous: with signals not held back, a KeyboardInterrupt at rename_in
    leaves no --out (the old set aside, the new one deleted with the staging dir)."""
    monkeypatch.setattr(outputs, "_signals_deferred", lambda: __import__("contextlib").nullcontext())
    out = tmp_path / "x"
    write_set(out, "old")

    def interrupt(step):
        if step == "rename_in":
            raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "_before_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_set(out, "new")
    assert not out.exists() and (tmp_path / ".x.old.tmp").is_dir()


def test_a_file_written_into_out_during_the_run_is_kept(tmp_path, monkeypatch, caplog):
    """A user's file put into --out after the stage's last ownership check goes aside with the old set; deleting
    that set removes only what its manifest lists, so the file ends up in the new --out (and, being foreign
    there, makes the next run refuse to replace --out) instead of being deleted."""
    out = tmp_path / "x"
    write_set(out, "old")

    def late_write(step):
        if step == "set_aside":  # after _check_owned: the last moment a user's write reaches the old set
            (out / "notes.txt").write_text("mine")
            (out / "sub" / "old.txt.mine").write_text("also mine")

    monkeypatch.setattr(outputs, "_before_step", late_write)
    with caplog.at_level("WARNING", logger=outputs.__name__):
        write_set(out, "new")
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "old.txt.mine").read_text() == "also mine"
    assert (out / "sub" / "new.txt").read_text() == "new" * 3 and not (out / "sub" / "old.txt").exists()
    assert "notes.txt was written into" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no set-aside or trash dir left
    monkeypatch.setattr(outputs, "_before_step", lambda step: None)
    with pytest.raises(ProbeError, match="did not write"):
        write_set(out, "again")


# ---------------------------------------------------------------------------------------------- 2. mount points

# what --out holds once the next run has cleaned up, after a kill at each step of `_swap_contents`
AFTER_CONTENT_KILL = {
    "copy_in": "old",
    "set_aside_contents": "old",
    "set_aside_entry": "old",
    "move_in_contents": "old",
    "move_in_entry": "old",
    "commit": "new",
}


def test_every_content_swap_step_is_tested():
    assert set(AFTER_CONTENT_KILL) == set(outputs.CONTENT_SWAP_STEPS)


@pytest.mark.parametrize("step", list(AFTER_CONTENT_KILL))
def test_a_kill_while_replacing_the_contents_of_an_unmovable_out_is_undone(tmp_path, step):
    sets = reference_sets(tmp_path)
    out = tmp_path / "data" / "x"
    write_set(out, "old")
    inode = out.stat().st_ino
    assert run_interrupted(out, step, "kill", busy=True) == 9
    with outputs.claim_output_dir(out, "verify"):
        pass
    assert snapshot(out) == sets[AFTER_CONTENT_KILL[step]]
    assert out.stat().st_ino == inode  # the dir itself never moved
    assert sorted(p.name for p in out.parent.iterdir()) == ["x"]


RECOVERY = """
import os, sys
from entropy_probe import outputs
outputs._before_step = lambda step: os._exit(9) if step == sys.argv[2] else None
with outputs.claim_output_dir(sys.argv[1], "verify"):
    pass
"""


@pytest.mark.parametrize("step", ["restore", "restore_entry"])
def test_a_kill_during_the_recovery_is_recovered_from_too(tmp_path, step):
    sets = reference_sets(tmp_path)
    out = tmp_path / "x"
    write_set(out, "old")
    assert run_interrupted(out, "move_in_entry", "kill", busy=True) == 9  # new entries half in
    args = [sys.executable, "-c", RECOVERY, str(out), step]
    assert subprocess.run(args, env=ENV).returncode == 9  # and the recovery killed half-way
    with outputs.claim_output_dir(out, "verify"):
        pass
    assert snapshot(out) == sets["old"] and sorted(p.name for p in tmp_path.iterdir()) == ["ref", "x"]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("step", ["set_aside_entry", "move_in_contents", "move_in_entry"])
def test_a_signal_while_replacing_the_contents_takes_effect_after(tmp_path, step, how):
    sets = reference_sets(tmp_path)
    out = tmp_path / "x"
    write_set(out, "old")
    assert run_interrupted(out, step, how, busy=True) == RETURN_CODES[how]
    assert snapshot(out) == sets["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["ref", "x"]


def test_an_out_that_cannot_be_renamed_gets_its_contents_replaced(tmp_path, monkeypatch):
    out = tmp_path / "x"
    write_set(out, "old")
    inode = out.stat().st_ino
    real_rename = os.rename

    def busy(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", busy)
    write_set(out, "new")
    write_set(out, "third")
    monkeypatch.undo()
    assert sorted(snapshot(out)) == [outputs.MANIFEST, "sub/third.txt", "summary.json"]
    assert out.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def _in_private_mount_namespace(script: str, tmp_path: Path) -> dict:
    """Run `script` (python, with MOUNT = a tmpfs dir) in a mount namespace of its own, so the tmpfs goes
    away with it; returns the JSON it prints. Skips where mounting is not allowed (not root, no unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a tmpfs in a private mount namespace")
    mount = tmp_path / "mnt"
    mount.mkdir()
    (tmp_path / "child.py").write_text(f"MOUNT = {str(mount)!r}\n" + textwrap.dedent(script))
    shell = f"mount -t tmpfs -o size=256k tmpfs {mount} && exec {sys.executable} {tmp_path / 'child.py'}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell], env=ENV, capture_output=True, text=True)
    if result.returncode != 0 and "mount" in result.stderr and "child.py" not in result.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


MOUNT_POINT_OUT = """
import json, os
from pathlib import Path
from entropy_probe import files, outputs

def write_set(out, tag):
    with outputs.staged_output_dir(out, stage="verify") as tmp:
        files.write_json(tmp / "summary.json", {"tag": tag})
        files.write_text(tmp / "sub" / f"{tag}.txt", tag * 3)

out = Path(MOUNT)  # --out is the mount point itself
assert os.path.ismount(out)
write_set(out, "old")
write_set(out, "new")
print(json.dumps({
    "ismount": os.path.ismount(out),
    "files": sorted(p.relative_to(out).as_posix() for p in out.rglob("*")),
    "tag": json.loads((out / "summary.json").read_text())["tag"],
    "beside": sorted(p.name for p in out.parent.iterdir()),
}))
"""


def test_a_real_mount_point_as_out(tmp_path):
    result = _in_private_mount_namespace(MOUNT_POINT_OUT, tmp_path)
    assert result["ismount"] and result["tag"] == "new"
    assert result["files"] == [outputs.MANIFEST, "sub", "sub/new.txt", "summary.json"]
    assert result["beside"] == ["child.py", "mnt"]  # no lock, staging or set-aside dir left


# ---------------------------------------------------------------------------------------------- 3. full disk

FULL_DISK = """
import json, os
from pathlib import Path
from entropy_probe import files, outputs
from entropy_probe.errors import ProbeError

def write_set(out, tag, size=0):
    with outputs.staged_output_dir(out, stage="verify") as tmp:
        files.write_json(tmp / "summary.json", {"tag": tag})
        files.write_text(tmp / "big.txt", "x" * size)

root = Path(MOUNT)
out = root / "v"
write_set(out, "old")
errors = []
try:  # the disk fills up while the stage writes
    write_set(out, "new", size=1 << 20)
except ProbeError as exc:
    errors.append(str(exc))
after_big = sorted(p.name for p in root.iterdir())
fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT)  # then 0 bytes free: not even a manifest fits
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    os.close(fd)
try:
    write_set(out, "new")
except ProbeError as exc:
    errors.append(str(exc))
print(json.dumps({
    "errors": errors,
    "after_big": after_big,
    "after_full": sorted(p.name for p in root.iterdir()),
    "tag": json.loads((out / "summary.json").read_text())["tag"],
}))
"""


def test_a_full_disk_is_one_line_and_leaves_no_staging_dir(tmp_path):
    """On a real 256 KiB tmpfs: a write that fills it, then a run with 0 bytes free."""
    result = _in_private_mount_namespace(FULL_DISK, tmp_path)
    assert len(result["errors"]) == 2, result
    for message in result["errors"]:
        assert message.startswith("cannot write ") and "No space left on device — free space" in message
    assert result["tag"] == "old"  # the old set is intact
    assert result["after_big"] == ["v"] and result["after_full"] == ["filler", "v"]  # no staging dir left


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_a_failed_marker_write_removes_the_staging_dir(tmp_path, monkeypatch):
    """The staging dir's manifest is its first write: when it fails, the dir is removed at once."""
    write_set(tmp_path / "v", "old")
    monkeypatch.setattr(outputs, "write_json", _raise(errno.ENOSPC))
    with pytest.raises(ProbeError, match="No space left on device — free space"):
        write_set(tmp_path / "v", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]


def test_a_staging_dir_killed_before_its_marker_is_removed_by_the_next_run(tmp_path):
    (tmp_path / ".v.k1ll3d00.tmp").mkdir()  # mkdtemp done, killed before the (empty) marker file was made
    (tmp_path / ".v.us3rd1r0.tmp").mkdir()
    (tmp_path / ".v.us3rd1r0.tmp" / "mine.txt").write_text("not ours: it holds something")
    write_set(tmp_path / "v", "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v.us3rd1r0.tmp", "v"]


# ---------------------------------------------------------------------------------------------- demo runs


SMALL = {
    "max_operand": 3,
    "hidden_size": 32,
    "warmup_steps": 5,
    "rl_steps": 3,
    "save_steps": 1,
    "prompts_per_step": 4,
    "num_generations": 2,
    "lora_rank": 2,
    "rl_lr": 0.01,
}


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two small demo runs (checkpoint-1..3), seed 0 built through the CLI with -S overrides (two of them
    settings the demo does not read), seed 1 through the library; and the CLI result of the first."""
    from stages import demo as demo_stage

    root = tmp_path_factory.mktemp("demos")
    overrides = [f"demo.{k}={v}" for k, v in SMALL.items()] + ["generation.max_new_tokens=8", "exact.fd_eps=0.01"]
    args = ["demo", "--params", str(REPO / "params.yaml"), "--out", str(root / "s0")]
    result = cli(*args, *[a for o in overrides for a in ("-S", o)])
    assert result.exit_code == 0, result.output
    for handler in logging.getLogger().handlers:  # the CLI logged to CliRunner's stream, closed by now
        if getattr(getattr(handler, "stream", None), "closed", False):
            logging.getLogger().removeHandler(handler)
    demo_stage.run(validate_params({"demo": {**SMALL, "seed": 1}}), root / "s1", dry_run=False)
    return root / "s0" / "run", root / "s1" / "run", result


def test_overrides_a_stage_does_not_read_are_named_on_stderr(demo_runs):
    result = demo_runs[2]
    warnings = [line for line in result.stderr.splitlines() if "warning: -S" in line]
    assert warnings == [
        "entropy-probe demo: warning: -S generation.max_new_tokens=8 was not read by this stage (no effect)",
        "entropy-probe demo: warning: -S exact.fd_eps=0.01 was not read by this stage (no effect)",
    ]


def test_the_default_out_key_counts_as_read_and_dry_runs_do_not_warn(tmp_path, monkeypatch):
    """A stage that reads only estimator.entropy, run without --out: -S paths.report chose its output dir."""
    import importlib
    import types

    def run(params, out_dir, dry_run):
        return f"read {params.estimator.entropy}"

    real_import = importlib.import_module
    fake = types.SimpleNamespace(run=run)
    monkeypatch.setattr(
        importlib, "import_module", lambda n, *a, **k: fake if n == "stages.report" else real_import(n, *a, **k)
    )
    overrides = [f"paths.report={tmp_path / 'r'}", "estimator.entropy=sequence", "generation.top_p=0.5"]
    args = ["report", "--params", str(REPO / "params.yaml"), *[a for o in overrides for a in ("-S", o)]]
    result = cli(*args)
    assert result.exit_code == 0 and result.stdout == "read sequence\n", result.output
    assert result.stderr.splitlines() == [
        "entropy-probe report: warning: -S generation.top_p=0.5 was not read by this stage (no effect)"
    ]
    assert cli(*args, "--dry-run").stderr == ""


def test_unread_overrides_match_keys_sections_and_entries():
    reads = {"generation.top_p", "probe.checkpoints", "exact.fd_eps"}
    overrides = ["generation.top_p=0.9", "generation=x", "probe.checkpoints.step2=a", "exact.max_sequences=9", "g.x=1"]
    assert unread_overrides(overrides, reads) == ["exact.max_sequences=9", "g.x=1"]


def ck(path) -> CheckpointParams:
    return CheckpointParams(path=str(path), dtype="fp32", device_map="cpu")


def paths_of(path):
    return resolve_paths(ck(path))


# ---------------------------------------------------------------------------------------------- 4. next checkpoint


def test_the_next_checkpoint_of_the_same_run_is_accepted(demo_runs, caplog):
    run, _, _ = demo_runs
    check_next_checkpoint(paths_of(run / "checkpoint-2"), paths_of(run / "checkpoint-3"))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    check_next_checkpoint(paths_of(run / "checkpoint-1"), paths_of(run / "checkpoint-3"))
    assert "checkpoint-3 is 2 trainer steps after" in caplog.text  # a forward gap: a warning, not a refusal


def test_a_step_backwards_is_refused(demo_runs):
    run, _, _ = demo_runs
    with pytest.raises(ProbeError, match=r"is at step 2 and checkpoint\.path .* at step 3 .*must be a later one"):
        check_next_checkpoint(paths_of(run / "checkpoint-3"), paths_of(run / "checkpoint-2"))
    with pytest.raises(ProbeError, match="must be a later one"):
        check_next_checkpoint(paths_of(run / "checkpoint-2"), paths_of(run / "checkpoint-2"))


def _copy(src: Path, dst: Path, base: Path | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of checkpoint `src` at `dst`, optionally naming another base dir, without the files in `drop`."""
    shutil.copytree(src, dst)
    if base is not None:
        config = json.loads((dst / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    for name in drop:
        (dst / name).unlink()
    return dst


def test_a_checkpoint_of_another_run_is_refused(demo_runs, tmp_path):
    run, other, _ = demo_runs
    this = paths_of(run / "checkpoint-2")
    # seed 1's checkpoint-3 as it is: another base model (the demo trains its own base per seed)
    with pytest.raises(ProbeError, match=r"is on base model .*s1/base, checkpoint\.path on .*s0/base"):
        check_next_checkpoint(this, paths_of(other / "checkpoint-3"))
    # the same, claiming seed 0's base: its logged history differs from this run's
    same_base = _copy(other / "checkpoint-3", tmp_path / "a" / "checkpoint-3", base=run.parent / "base")
    with pytest.raises(ProbeError, match="log of the next checkpoint .* differs from checkpoint.path's up to step 2"):
        check_next_checkpoint(this, paths_of(same_base))
    # and without trainer_state.json: its Adam state does not continue this one
    no_state = _copy(same_base, tmp_path / "b" / "checkpoint-3", drop=("trainer_state.json",))
    with pytest.raises(ProbeError, match=r"Adam state of the next checkpoint .* does not continue .*β₂\^k"):
        check_next_checkpoint(this, paths_of(no_state))


def test_a_stale_copy_named_as_a_later_checkpoint_is_refused(demo_runs, tmp_path):
    """checkpoint-2 copied as checkpoint-5: its trainer_state.json says step 2; without it, its Adam state does."""
    run, _, _ = demo_runs
    this = paths_of(run / "checkpoint-2")
    renamed = _copy(run / "checkpoint-2", tmp_path / "a" / "checkpoint-5")
    with pytest.raises(ProbeError, match=r"at step 2 and checkpoint\.path .* at step 2 \(by trainer_state.json's"):
        check_next_checkpoint(this, paths_of(renamed))
    stale = _copy(renamed, tmp_path / "b" / "checkpoint-5", drop=("trainer_state.json",))
    with pytest.raises(ProbeError, match=r"at Adam step 2, checkpoint\.path's at 2: it does not advance"):
        check_next_checkpoint(this, paths_of(stale))


def test_another_adapter_config_is_refused(demo_runs, tmp_path):
    run, _, _ = demo_runs
    nxt = _copy(run / "checkpoint-3", tmp_path / "run" / "checkpoint-3")
    config = json.loads((nxt / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]
    (nxt / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ProbeError, match="differ in adapter_config.json 'lora_alpha'"):
        check_next_checkpoint(paths_of(run / "checkpoint-2"), paths_of(nxt))


# ---------------------------------------------------------------------------------------------- 5. fingerprint


TRAINER_FILE_KEYS = {
    "training_args.bin": "training_args_path",
    "trainer_config.json": "trainer_config_path",
    "trainer_state.json": "trainer_state_path",
}


@pytest.mark.parametrize("name", list(TRAINER_FILE_KEYS))
def test_the_fingerprint_covers_the_trainer_settings(demo_runs, tmp_path, name):
    run, other, _ = demo_runs
    copy = shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2")
    fingerprint = checkpoint_fingerprint(paths_of(run / "checkpoint-2"))
    assert checkpoint_fingerprint(paths_of(copy)) == fingerprint  # content, not location
    if name == "trainer_config.json":  # another max_grad_norm: another emulated update
        config = json.loads((copy / name).read_text())
        config["max_grad_norm"] = 0.5
        (copy / name).write_text(json.dumps(config))
    else:
        shutil.copy(other / "checkpoint-2" / name, copy / name)  # the other run's (another seed)
    assert getattr(paths_of(copy), TRAINER_FILE_KEYS[name]) == copy / name  # the file verify reads
    assert checkpoint_fingerprint(paths_of(copy)) != fingerprint


# ---------------------------------------------------------------------------------------------- 6. verify


FILE_SIZE_LIMITED = """
import importlib, resource, sys, types
from entropy_probe import files, outputs

resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # ulimit -f 4 (KiB)


def run(params, out_dir, dry_run):  # the stage: one file of 64 KiB
    with outputs.staged_output_dir(out_dir) as tmp:
        files.write_text(tmp / "big.txt", "x" * 65536)


real_import = importlib.import_module


def import_module(name, *args, **kwargs):  # the CLI imports the stage module by name
    return types.SimpleNamespace(run=run) if name == "stages.verify" else real_import(name, *args, **kwargs)


importlib.import_module = import_module
from stages.cli import app

app()
"""


@pytest.mark.e2e
def test_a_file_size_limit_is_one_line_like_a_full_disk(tmp_path):
    """ulimit -f in a child running the CLI (CPython ignores SIGXFSZ, so the write fails with EFBIG): one
    line, exit 2, and no --out, staging dir or parent dir left behind."""
    out = tmp_path / "deep" / "v"
    args = ["verify", "--params", str(REPO / "params.yaml"), "-S", f"checkpoint.path={tmp_path / 'ck'}", "--out"]
    cmd = [sys.executable, "-c", FILE_SIZE_LIMITED, *args, str(out)]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    line = one_error_line(result.stderr, result.returncode)
    assert line == (
        f"entropy-probe verify: error: cannot write {out / 'big.txt'}: File too large — raise the file size "
        "limit (ulimit -f) or choose another --out"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_absurd_stored_learning_rate_is_refused_at_verify(demo_runs, tmp_path):
    run, _, _ = demo_runs
    ckpt = shutil.copytree(run / "checkpoint-2", tmp_path / "checkpoint-2")
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for group in state["param_groups"]:
        group["lr"] = 1e300
    torch.save(state, ckpt / "optimizer.pt")
    out = tmp_path / "v"
    result = cli("verify", "--params", str(REPO / "params.yaml"), "-S", f"checkpoint.path={ckpt}", "--out", str(out))
    line = one_error_line(result.stderr, result.exit_code)
    assert "lr stored in optimizer.pt param group 0 is 1e+300, which is no fine-tuning learning rate" in line
    assert not out.exists()


def test_a_pickle_in_the_base_model_is_one_line_and_never_runs(demo_runs, tmp_path):
    import pickle

    from safetensors.torch import load_file

    run, _, _ = demo_runs
    base = shutil.copytree(run.parent / "base", tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({**weights, "payload": Payload()}, base / "pytorch_model.bin", pickle_module=pickle)
    out = tmp_path / "v"
    overrides = ["-S", f"checkpoint.path={run / 'checkpoint-2'}", "-S", f"checkpoint.base_model={base}"]
    result = cli("verify", "--params", str(REPO / "params.yaml"), *overrides, "--out", str(out))
    line = one_error_line(result.stderr, result.exit_code)
    assert "are a pickle that torch refuses to load with weights_only (it refers to posix.system)" in line
    assert "convert them to safetensors" in line
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------------------------------------- 7. --out paths


@pytest.fixture()
def no_stage_import(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def refuse(name, *a, **k):
        if name.startswith("stages."):
            raise AssertionError(f"stage module {name} imported before the --out was checked")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", refuse)


def _refused_cli(tmp_path: Path, out: Path, *overrides: str) -> str:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"checkpoint": {"path": str(tmp_path / "missing")}}))
    args = ["verify", "--params", str(tmp_path / "params.yaml"), *[a for o in overrides for a in ("-S", o)]]
    result = cli(*args, "--out", str(out))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


def test_a_refused_run_creates_no_parent_dirs(tmp_path):
    line = _refused_cli(tmp_path, tmp_path / "a" / "b" / "c" / "out")
    assert "checkpoint" in line and "not found" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(
    "name, fragment",
    [("x" * 256, "has a name of 256 bytes"), ("/".join(["y" * 250] * 20), "bytes long with its lock file")],
    ids=["name-over-255", "path-over-4096"],
)
def test_an_out_the_file_system_cannot_hold_is_one_line_and_creates_nothing(tmp_path, no_stage_import, name, fragment):
    line = _refused_cli(tmp_path, tmp_path / name)
    assert fragment in line and "choose a shorter --out" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_an_out_name_of_250_characters_works(tmp_path):
    out = tmp_path / ("z" * 250)
    write_set(out, "a")
    write_set(out, "b")  # the lock and staging names beside it are shortened to fit 255 bytes
    assert sorted(snapshot(out)) == [outputs.MANIFEST, "sub/b.txt", "summary.json"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# ---------------------------------------------------------------------------------------------- 8. reward functions


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "builtins.print", "json:dumps"])
def test_a_reward_function_that_cannot_be_one_is_refused_before_it_is_called(name):
    from entropy_probe.task import get_reward_fn

    with pytest.raises(ProbeError, match=rf"reward function '{name}.*(is a built-in|cannot be called as)") as err:
        get_reward_fn(name)
    assert "\n" not in str(err.value) and "reward(response: str, answer: str | None) -> float" in str(err.value)


def test_a_reward_function_that_raises_is_one_line_naming_function_prompt_and_exception():
    from entropy_probe.task import score_responses

    def picky(response: str, answer: str | None) -> float:
        if response == "boom":
            raise ZeroDivisionError("division by zero")
        return 1.0

    with pytest.raises(ProbeError) as err:
        score_responses(picky, ["8", "boom"], ["8", "8"], prompts=["3+5=", "4+4="])
    assert str(err.value) == (
        "reward function 'picky' raised ZeroDivisionError: division by zero for response 1 ('boom') to prompt "
        "'4+4=' — fix the reward function (it is called as fn(response, answer) with answer a str or None)"
    )


# ---------------------------------------------------------------------------------------------- 9. noise

TRUST_CHECK = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
if sys.argv[1] == "quiet":
    from stages.cli import _quiet_libraries
    _quiet_libraries()
from kernels._internals.hf_hub import _check_trust_remote_code
_check_trust_remote_code("kernels-community/quantization-bitsandbytes", True, False)  # offline, as in a stage
"""


def test_the_kernels_publisher_trust_warning_is_silenced():
    pytest.importorskip("kernels._internals.hf_hub")

    def stderr(mode: str) -> str:
        args = [sys.executable, "-c", TRUST_CHECK, mode]
        return subprocess.run(args, env=ENV, capture_output=True, text=True, check=True).stderr

    assert "Skipping publisher trust check" in stderr("loud")  # what bitsandbytes triggers on AVX512-BF16 CPUs
    assert stderr("quiet") == ""
