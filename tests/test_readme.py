"""Every shell command the README shows works as written after `make demo`.

The demo pipeline runs once (`dvc repro`, smaller batches than params.yaml so it fits CI) in a copy of the
repository; then each command of the README's ```bash blocks runs there, in order, and must exit 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_repo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# commands that are not run here, and why
NOT_RUN = {
    "make demo": "replaced by the dvc repro below (same pipeline, smaller batches)",
    "make test": "this is the test suite",
    "source .venv/bin/activate": "the venv's bin is on PATH",
    "torchrun": "multi-process runs are tested in test_distributed.py",
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def readme_python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_commands_are_parsed():
    commands = readme_commands((REPO / "README.md").read_text())
    assert "make demo" in commands and "make test" in commands
    assert any(c.startswith("entropy-probe delta-h1 --dry-run") for c in commands)
    assert all("\\" not in c for c in commands)


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    """A copy of the repository after `dvc repro` (the demo pipeline, smaller batches), with the params keys
    every stage read recorded (ENTROPY_PROBE_RECORD_PARAMS) in params_reads.jsonl."""
    if not (BIN / "dvc").exists() or not (BIN / "entropy-probe").exists():
        pytest.skip("dvc / entropy-probe console scripts not installed in this environment")
    repo = tmp_path_factory.mktemp("demo_repo")
    copy_repo(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    params_path = repo / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["batch_config"].update(B_E=24, B_U=4)
    params["truth"]["eta_multipliers"] = [0.5, 1.0]
    params["exact"]["eta_multipliers"] = [0.5, 1.0]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    reads = repo.parent / f"{repo.name}_params_reads.jsonl"  # outside the repo: no stage owns it
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "ENTROPY_PROBE_RECORD_PARAMS": str(reads),
    }
    _run(repo, env, "dvc repro", timeout=900)
    env.pop("ENTROPY_PROBE_RECORD_PARAMS")
    # a commit of the demo's results, as a user's clone has one (`dvc exp run` / `dvc metrics diff` need it)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "demo"], cwd=repo, check=True, capture_output=True)
    return repo, env, reads


def _run(repo: Path, env: dict, command: str, timeout: int) -> subprocess.CompletedProcess:
    """Run one README command as a user would type it (bash: `&&` and globs work)."""
    out = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
def test_every_readme_command_works_after_the_demo(demo_repo):
    repo, env, _ = demo_repo
    ran = []
    for command in readme_commands((REPO / "README.md").read_text()):
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        out = _run(repo, env, command, timeout=300)
        if "--dry-run" in command:  # the plan on stdout, nothing written
            assert "plan" in out.stdout, out.stdout
        ran.append(command)
    assert any(c.startswith("entropy-probe") for c in ran) and any(c.startswith("dvc") for c in ran)
    for block in readme_python_blocks((REPO / "README.md").read_text()):
        _run(repo, env, f"{shlex.quote(sys.executable)} - <<'EOF'\n{block}EOF", timeout=300)


@pytest.mark.slow
def test_every_params_key_a_stage_reads_is_tracked_by_dvc(demo_repo):
    """The keys each stage read during the run are covered by its dvc.yaml params (a section or the key) or set
    on its command line; paths.* are wired through commands and deps. A missing one means changing that
    key would not re-run the stage."""
    from test_dvc_pipeline import cli_stage, dvc_stages

    _, _, reads_file = demo_repo
    records = [json.loads(line) for line in reads_file.read_text().splitlines()]
    by_cli = {cli_stage(body["cmd"]): body for body in dvc_stages().values()}
    assert {r["stage"] for r in records} == set(by_cli)  # every stage ran and was recorded
    missing = set()
    for record in records:
        body = by_cli[record["stage"]]
        tracked = list(body.get("params", [])) + re.findall(r"-S ([\w.]+)=", body["cmd"]) + ["paths"]
        for key in record["reads"]:
            if not any(key == entry or key.startswith(entry + ".") for entry in tracked):
                missing.add((record["stage"], key))
    assert not missing, f"params read but not listed in dvc.yaml: {sorted(missing)}"
