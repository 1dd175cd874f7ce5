"""Start-up cost: what the CLI imports before it has work to do.

`entropy-probe --help`, `entropy-probe STAGE --help` and a run refused before its stage starts load none of
the heavy libraries (torch alone takes seconds to import). bitsandbytes is needed only for QLoRA: a plain LoRA
load works without it, and our own code imports it on the QLoRA path only. (peft itself imports
bitsandbytes whenever it is installed, so a LoRA load in a normal install still loads it; see the last test.)

Each check runs in a fresh interpreter, since this one has long since imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "datasets", "safetensors", "trl"}
MARK = "MODULES-LOADED:"

# runs the typer app as the console script does, then reports its exit code and the top-level packages loaded
RUN_CLI = f"""
import json, sys
from stages.cli import app
try:
    app(sys.argv[1:], prog_name="entropy-probe")
    code = 0
except SystemExit as exc:
    code = exc.code
loaded = sorted({{name.split(".")[0] for name in sys.modules}})
print({MARK!r} + json.dumps({{"code": code, "loaded": loaded}}), file=sys.stderr)
"""


def run_python(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def cli_in_fresh_process(*cli_args: str, cwd: Path = REPO) -> tuple[int, set[str], str]:
    """(exit code, top-level packages in sys.modules at exit, stdout+stderr) of `entropy-probe *cli_args`."""
    proc = run_python("-c", RUN_CLI, *cli_args, cwd=cwd)
    marked = [line for line in proc.stderr.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and len(marked) == 1, proc.stdout + proc.stderr
    report = json.loads(marked[0].removeprefix(MARK))
    return report["code"], set(report["loaded"]), proc.stdout + proc.stderr


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime` output ('import time: self | cumulative | name')."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    return names


@pytest.mark.e2e
def test_help_loads_no_heavy_library():
    code, loaded, output = cli_in_fresh_process("--help")
    assert code == 0
    assert "verify" in output and "delta-h1" in output  # the stage list really was printed
    assert loaded & HEAVY == set()
    assert "entropy_probe" in loaded  # the check sees our own imports (entropy_probe.errors)


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["verify", "delta-h1", "report"])
def test_stage_help_loads_no_heavy_library(stage):
    code, loaded, output = cli_in_fresh_process(stage, "--help")
    assert code == 0 and "--dry-run" in output
    assert loaded & HEAVY == set()


@pytest.mark.e2e
def test_console_script_verify_help_imports_no_heavy_library():
    """The installed `entropy-probe` script itself, every import it makes listed by -X importtime."""
    script = Path(sys.executable).parent / "entropy-probe"
    assert script.is_file(), f"no console script at {script}: pip install -e . first"
    proc = run_python("-X", "importtime", str(script), "verify", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout
    loaded = imported_modules(proc.stderr)
    assert {"typer", "stages", "entropy_probe"} <= loaded  # the parse found the imports that do happen
    assert loaded & HEAVY == set()


@pytest.mark.e2e
def test_refused_out_is_refused_before_any_heavy_import(tmp_path):
    """The output-safety check runs before the stage module (and its torch) is imported."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (tmp_path / "params.yaml").write_text(f"checkpoint:\n  path: {checkpoint}\n")
    code, loaded, output = cli_in_fresh_process("verify", "--out", str(checkpoint), cwd=tmp_path)
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(MARK)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("entropy-probe verify: error:"), output
    assert "checkpoint.path" in lines[0]
    assert loaded & HEAVY == set()


# the LoRA / QLoRA load with bitsandbytes made uninstallable; reports which modules tried to import it
LOAD_WITHOUT_BNB = f"""
import builtins, json, sys
sys.modules["bitsandbytes"] = None  # as if not installed: import raises ImportError, find_spec gives None
importers = set()
real_import = builtins.__import__

def recording_import(name, globals=None, *args, **kwargs):
    if name == "bitsandbytes" or name.startswith("bitsandbytes."):
        importers.add((globals or {{}}).get("__name__", "?"))
    return real_import(name, globals, *args, **kwargs)

builtins.__import__ = recording_import
from entropy_probe.checkpoint import load_policy_model, resolve_paths
from entropy_probe.errors import ProbeError
from entropy_probe.params import CheckpointParams

report = {{}}
ck = CheckpointParams(path=sys.argv[1], dtype="fp32", device_map="cpu")
model = load_policy_model(ck, resolve_paths(ck))
report["lora_trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
report["lora_importers"] = sorted(importers)
importers.clear()
try:
    load_policy_model(ck.model_copy(update={{"use_qlora": True}}), resolve_paths(ck))
    report["qlora_error"] = None
except ProbeError as exc:
    report["qlora_error"] = str(exc)
report["qlora_importers"] = sorted(importers)
print({MARK!r} + json.dumps(report), file=sys.stderr)
"""


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 base and a LoRA adapter on q_proj/v_proj, saved as PEFT does (plus a placeholder optimizer.pt,
    which resolve_paths requires but loading the model does not read)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from entropy_probe.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    build_model(hidden_size=32, num_layers=2, num_heads=4).save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # so the adapter records base_dir as its base
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    weights_dir = root / "adapter"
    get_peft_model(base, config).save_pretrained(weights_dir)
    (weights_dir / "optimizer.pt").write_bytes(b"")
    return weights_dir


def test_lora_loads_without_bitsandbytes_and_only_qlora_asks_for_it(lora_checkpoint):
    proc = run_python("-c", LOAD_WITHOUT_BNB, str(lora_checkpoint))
    marked = [line for line in proc.stderr.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and len(marked) == 1, proc.stderr[-3000:]
    report = json.loads(marked[0].removeprefix(MARK))
    # LoRA: loaded, the adapter trainable, and no module of ours tried to import bitsandbytes
    assert report["lora_trainable"] and all("lora_" in name for name in report["lora_trainable"])
    assert len(report["lora_trainable"]) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    ours = ("entropy_probe", "stages")
    assert not [m for m in report["lora_importers"] if m.startswith(ours)], report["lora_importers"]
    # QLoRA: our loader imports it and, missing, says so in one line with the fix
    assert "entropy_probe.checkpoint" in report["qlora_importers"]
    assert report["qlora_error"] is not None and "checkpoint.use_qlora needs bitsandbytes" in report["qlora_error"]
    assert "pip install bitsandbytes" in report["qlora_error"]
