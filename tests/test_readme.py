"""Every shell command the README shows works as written after `make demo`.

The demo pipeline runs once (`dvc repro`, at a smaller scale than params.yaml so it fits CI: conftest's
demo_pipeline) in a copy of the repository; then each command of the README's ```bash blocks runs in a copy of
that, in order, and must exit 0.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_demo_repo, repo_env

REPO = Path(__file__).resolve().parents[1]

# commands that are not run here, and why
NOT_RUN = {
    "make demo": "replaced by conftest's demo_pipeline (the same dvc repro, at a smaller scale)",
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
def demo_repo(demo_pipeline, tmp_path_factory):
    """A copy of the repository after `dvc repro` (conftest's demo_pipeline: the whole pipeline at CI scale, its
    results committed), the environment to run commands in, and the params keys every stage read during that run."""
    repo = copy_demo_repo(demo_pipeline, tmp_path_factory.mktemp("demo_repo"))
    return repo, repo_env(), demo_pipeline / "params_reads.jsonl"


def _run(repo: Path, env: dict, command: str) -> subprocess.CompletedProcess:
    """Run one README command as a user would type it (bash: `&&` and globs work); no time limit (a slow machine
    is not a failure)."""
    out = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
@pytest.mark.e2e
def test_every_readme_command_works_after_the_demo(demo_repo):
    repo, env, _ = demo_repo
    ran = []
    for command in readme_commands((REPO / "README.md").read_text()):
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        out = _run(repo, env, command)
        if "--dry-run" in command:  # the plan on stdout, nothing written
            assert "plan" in out.stdout, out.stdout
        ran.append(command)
    assert any(c.startswith("entropy-probe") for c in ran) and any(c.startswith("dvc") for c in ran)
    for block in readme_python_blocks((REPO / "README.md").read_text()):
        _run(repo, env, f"{shlex.quote(sys.executable)} - <<'EOF'\n{block}EOF")
    # the in-memory example (Probe, same params and seeds) wrote the delta-h1 stage's numbers, every one of them
    in_memory = json.loads((repo / "data/tries/in_memory/delta_h1.json").read_text())
    stage = json.loads((repo / "data/probe/step6/delta_h1/delta_h1.json").read_text())
    assert in_memory == stage


@pytest.mark.slow
@pytest.mark.e2e
def test_every_params_key_a_stage_reads_is_tracked_by_dvc(demo_repo):
    """The keys each stage read during the run are covered by its dvc.yaml params (a section or the key) or set
    on its command line; paths.* are wired through commands and deps. A missing one means changing that
    key would not re-run the stage."""
    from test_dvc_pipeline import cli_stage, dvc_stages

    _, _, reads_file = demo_repo
    records = [json.loads(line) for line in reads_file.read_text().splitlines()]
    every_stage = {cli_stage(body["cmd"]) for body in dvc_stages().values()}
    assert {r["stage"] for r in records} == every_stage  # every stage ran and was recorded
    missing = untracked_reads(records)
    assert not missing, f"params read but not listed in dvc.yaml: {sorted(missing)}"


def untracked_reads(records: list[dict]) -> set[tuple[str, str]]:
    """(stage, key) for each params key a stage read ({stage, reads} records of ENTROPY_PROBE_RECORD_PARAMS) that is
    not covered by its dvc.yaml params (a section or the key) nor set on its command line; paths.* are wired
    through commands and deps."""
    from test_dvc_pipeline import cli_stage, dvc_stages

    by_cli = {cli_stage(body["cmd"]): body for body in dvc_stages().values()}
    missing = set()
    for record in records:
        body = by_cli[record["stage"]]
        tracked = list(body.get("params", [])) + re.findall(r"-S ([\w.]+)=", body["cmd"]) + ["paths"]
        for key in record["reads"]:
            if not any(key == entry or key.startswith(entry + ".") for entry in tracked):
                missing.add((record["stage"], key))
    return missing
