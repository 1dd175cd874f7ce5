"""Every shell command the README shows works as written after `make demo`.

The demo pipeline runs once (`dvc repro`, at a smaller scale than params.yaml so it fits CI: conftest's
demo_pipeline) in a copy of the repository; then the README's commands run in copies of that and must exit 0:
the block that runs a DVC experiment and goes back to the committed settings (`dvc exp run` ... `dvc repro`: most
stages run twice, the longest part) in one copy, every other ```bash block, in order, then the ```python blocks
in another. Each block starts from the state `make demo` leaves, so the two parts are independent tests, which
pytest-xdist runs on both workers at once (each is a scope of its own under --dist loadscope).
"""

from __future__ import annotations

import json
import re
import subprocess
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


def readme_blocks(text: str) -> list[list[str]]:
    """The commands of each of the README's ```bash blocks: continuation lines joined, comments dropped."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = (line.split("  #")[0].strip() for line in joined.splitlines())
        blocks.append([line for line in lines if line and not line.startswith("#")])
    return blocks


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, in order."""
    return [command for block in readme_blocks(text) for command in block]


def readme_parts(text: str) -> tuple[list[str], list[str]]:
    """The commands run here (all but NOT_RUN's), in the README's order, in two parts that each start from the
    state `make demo` leaves: the ```bash block that runs a DVC experiment (`dvc exp run`, then back to the committed
    settings), and every other block."""
    experiment, others = [], []
    for block in readme_blocks(text):
        run = [c for c in block if not any(c.startswith(prefix) for prefix in NOT_RUN)]
        (experiment if any(c.startswith("dvc exp run") for c in block) else others).extend(run)
    return experiment, others


def readme_python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


README = (REPO / "README.md").read_text()
DELTA_H1_JSON = "data/probe/step6/delta_h1/delta_h1.json"  # the delta-h1 stage's numbers (the Python example's too)


def test_readme_commands_are_parsed():
    commands = readme_commands(README)
    assert "make demo" in commands and "make test" in commands
    assert any(c.startswith("entropy-probe delta-h1 --dry-run") for c in commands)
    assert all("\\" not in c for c in commands)
    # the two parts run every command but NOT_RUN's, each exactly once
    experiment, others = readme_parts(README)
    assert any(c.startswith("dvc exp run") for c in experiment) and "dvc metrics diff" in experiment
    run = [c for c in commands if not any(c.startswith(prefix) for prefix in NOT_RUN)]
    assert sorted(experiment + others) == sorted(run)


def _run(repo: Path, env: dict, command: str) -> subprocess.CompletedProcess:
    """Run one README command as a user would type it (bash: `&&` and globs work); no time limit (a slow machine
    is not a failure)."""
    out = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    if "--dry-run" in command:  # the plan on stdout, nothing written
        assert "plan" in out.stdout, out.stdout
    return out


# The longest part, and this module's first test that needs demo_pipeline: conftest starts it first (it builds
# demo_pipeline), and as this module has more than two tests, xdist's loadscope gives its worker no other module
# before this test ends.
@pytest.mark.slow
@pytest.mark.e2e
def test_the_readme_experiment_commands_work_after_the_demo(demo_pipeline, tmp_path):
    """`dvc metrics show`, `dvc exp run -S ...` (re-runs the stages that read the setting), `dvc metrics diff`,
    then back to the committed settings (`git checkout -- params.yaml && dvc repro`), in a copy of the demo."""
    experiment, _ = readme_parts(README)
    repo = copy_demo_repo(demo_pipeline, tmp_path / "repo")
    env = repo_env()
    outputs = [_run(repo, env, command).stdout for command in experiment]
    # back to the committed settings: the delta-h1 stage's numbers are again the demo's, every one of them (and the
    # other part checks the in-memory example writes the demo's: as when the examples ran after these commands)
    restored = json.loads((repo / DELTA_H1_JSON).read_text())
    assert restored == json.loads((demo_pipeline / "repo" / DELTA_H1_JSON).read_text())
    # ... from DVC's run cache, not recomputed, as the README says (dvc.yaml keeps the stage's outputs in DVC's cache)
    assert "Stage 'delta-h1@step6' is cached" in outputs[-1], outputs[-1]


class TestEveryOtherBlock:
    """A scope of its own under xdist's --dist loadscope: it runs on the other worker while the experiment part
    runs (from its place in the run order; demo_pipeline is built by then)."""

    @pytest.mark.slow
    @pytest.mark.e2e
    def test_every_other_readme_command_and_the_python_examples_work_after_the_demo(
        self, demo_pipeline, tmp_path, monkeypatch
    ):
        _, others = readme_parts(README)
        repo = copy_demo_repo(demo_pipeline, tmp_path / "repo")
        env = repo_env()
        for command in others:
            _run(repo, env, command)
        assert any(c.startswith("entropy-probe") for c in others) and any(c.startswith("dvc") for c in others)
        # the Python examples as a notebook runs them: in one interpreter (this one, whose libraries are loaded; a
        # fresh one would only add its imports), in the repository, one block after the other
        monkeypatch.chdir(repo)
        for i, block in enumerate(readme_python_blocks(README)):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "__main__"})
        # the in-memory example (Probe, same params and seeds) wrote the delta-h1 stage's numbers, every one of them
        in_memory = json.loads((repo / "data/tries/in_memory/delta_h1.json").read_text())
        stage = json.loads((repo / DELTA_H1_JSON).read_text())
        assert in_memory == stage


@pytest.mark.slow
@pytest.mark.e2e
def test_every_params_key_a_stage_reads_is_tracked_by_dvc(demo_pipeline):
    """The keys each stage read during the run are covered by its dvc.yaml params (a section or the key) or set
    on its command line; paths.* are wired through commands and deps. A missing one means changing that
    key would not re-run the stage."""
    from test_dvc_pipeline import cli_stage, dvc_stages

    records = [json.loads(line) for line in (demo_pipeline / "params_reads.jsonl").read_text().splitlines()]
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
