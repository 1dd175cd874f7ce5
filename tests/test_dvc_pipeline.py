"""dvc.yaml cannot drift from the code: every stage depends on the library and on its own stage module
(and on any other stage module it imports), and runs the CLI stage it is named after.

The params half of the check needs a pipeline run: tests/test_readme.py records the params keys each stage
reads during `dvc repro` and compares them with this file's params lists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from stages.cli import STAGES

REPO = Path(__file__).resolve().parents[1]


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, `foreach` ones by their `do` body."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def cli_stage(cmd: str) -> str:
    match = re.match(r"entropy-probe ([a-z0-9-]+)", cmd.strip())
    assert match, f"stage command does not run entropy-probe: {cmd!r}"
    return match.group(1)


def imported_stage_modules(path: Path) -> set[str]:
    """stages.* modules a stage module imports (other than itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stages"))
    return found - {"stages", f"stages.{path.stem}"}


def test_every_cli_stage_is_in_the_pipeline():
    in_pipeline = {cli_stage(body["cmd"]) for body in dvc_stages().values()}
    assert in_pipeline == set(STAGES)


def test_each_stage_depends_on_the_library_and_its_own_module():
    for name, body in dvc_stages().items():
        module = STAGES[cli_stage(body["cmd"])][0]
        own = module.replace(".", "/") + ".py"
        deps = set(body.get("deps", []))
        assert "entropy_probe" in deps, f"{name}: deps lack the library (entropy_probe)"
        assert own in deps, f"{name}: deps lack its stage module {own}"
        for other in imported_stage_modules(REPO / own):
            assert other.replace(".", "/") + ".py" in deps, f"{name}: imports {other}, not in its deps"


def test_params_lists_name_real_keys():
    """Every params entry of dvc.yaml is a section or a key of params.yaml (a typo would track nothing)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, body in dvc_stages().items():
        for entry in body.get("params", []):
            node = params
            for part in entry.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params entry '{entry}' is not in params.yaml"
                node = node[part]
