"""Shared fixtures: tiny offline models and tokenizers (never downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from entropy_probe.tiny import build_tokenizer

    return build_tokenizer()


def make_lora_model(seed: int = 0, rank: int = 2, hidden_size: int = 32, head_scale: float = 1.0):
    """Tiny Qwen2 + LoRA adapter with non-zero B (so both A and B get gradients), eval mode, fp32.

    head_scale multiplies the LM head: 40 makes the policy far from uniform (at the uniform maximum ∇H
    vanishes and ΔH is second order), the model most estimator tests use."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tiny import build_model

    base = build_model(hidden_size=hidden_size, num_layers=2, num_heads=4, seed=seed)
    torch.manual_seed(seed + 1000)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    return model.eval()


@pytest.fixture()
def lora_model():
    return make_lora_model()


@pytest.fixture(scope="module")
def model():
    """The estimator tests' model: a tiny LoRA Qwen2 whose policy is far from uniform (at the uniform maximum
    ∇H vanishes and ΔH is second order), float32 as the stages run. A test module may define its own."""
    return make_lora_model(seed=3, rank=2, head_scale=40.0)


REPO = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path) -> None:
    """The repository's files (tracked, and new ones git does not ignore) copied into `dest`."""
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():  # a tracked file deleted in the working tree is listed but absent
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)


# ---------------------------------------------------------------------------------------------- built once per session
# Expensive read-only artifacts (the demo, Trainer checkpoints) are built once per test session and shared. Under
# pytest-xdist every worker is its own session, so they are built into a folder all workers of the run share,
# by whichever worker asks first, under a file lock (the pattern pytest-xdist documents); the others wait for it.
# A test that writes into one copies it into its tmp_path first.


def _session_shared_root(tmp_path_factory) -> Path:
    """A folder of this run only: the workers' common parent under xdist (pytest-N/), else this session's basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` run once per test run (all xdist workers together); returns the folder, read-only by contract."""
    root = _session_shared_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # the remains of a build that failed in another worker
            folder.mkdir()
            build(folder)
            done.touch()  # last: a folder without its marker is never handed out
    return folder


@pytest.fixture(scope="session")
def trainer_checkpoint(tmp_path_factory):
    """checkpoint(**config): the directory of `write_trainer_checkpoint(root, **config)`, built once per run for
    each config and shared by every test asking for the same one (copy it before writing into it)."""
    from trainer_ckpt import write_trainer_checkpoint

    def checkpoint(**config) -> Path:
        name = "trainer_ckpt-" + "-".join(f"{k}={v}" for k, v in sorted(config.items()))
        root = build_once(tmp_path_factory, name, lambda folder: write_trainer_checkpoint(folder, **config))
        (ckpt,) = (root / "run").glob("checkpoint-*")
        return ckpt

    return checkpoint


# test_demo's small demo (a 2-step TRL run, seconds to build); test_bad_input probes its checkpoints too
SMALL_DEMO = {
    "max_operand": 3,
    "hidden_size": 32,
    "warmup_steps": 5,
    "rl_steps": 2,
    "save_steps": 1,
    "prompts_per_step": 4,
    "num_generations": 2,
    "lora_rank": 2,
    "rl_lr": 0.01,
}


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """The demo stage's output for SMALL_DEMO (built once per run; read-only: its paths name this folder)."""
    from entropy_probe.params import validate_params
    from stages import demo as demo_stage

    def build(folder: Path) -> None:
        demo_stage.run(validate_params({"demo": SMALL_DEMO}), folder / "demo", dry_run=False)

    return build_once(tmp_path_factory, "small_demo", build) / "demo"


BIN = Path(sys.executable).parent


def console_scripts_installed() -> bool:
    return (BIN / "dvc").exists() and (BIN / "entropy-probe").exists()


def repo_env(**extra: str) -> dict[str, str]:
    """The environment the end-to-end tests run dvc and the console script in: the venv's bin first, offline."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **extra}


@pytest.fixture(scope="session")
def demo_repo_template(tmp_path_factory) -> Path:
    """A git-initialised copy of the repository in which `dvc repro demo` built the shipped demo (params.yaml's),
    once per run; beside it, demo_params_reads.jsonl: the params keys the demo stage read (ENTROPY_PROBE_RECORD_PARAMS).
    Tests copy it (copy_demo_repo) and run the rest of the pipeline there: DVC sees the demo stage up to date."""
    if not console_scripts_installed():
        pytest.skip("dvc / entropy-probe console scripts not installed in this environment")

    def build(folder: Path) -> None:
        repo = folder / "repo"
        copy_repo(repo)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        env = repo_env(ENTROPY_PROBE_RECORD_PARAMS=str(folder / "demo_params_reads.jsonl"))
        out = subprocess.run(["dvc", "repro", "demo"], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"`dvc repro demo` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"

    return build_once(tmp_path_factory, "demo_repo", build)


def copy_demo_repo(template: Path, dest: Path) -> Path:
    """A private copy of demo_repo_template's repository (git, DVC cache and lock, data/demo) at `dest`."""
    shutil.copytree(template / "repo", dest, symlinks=True, dirs_exist_ok=True)
    return dest
