"""Shared fixtures: tiny offline models and tokenizers (never downloaded), the artifacts built once per test run
(Trainer checkpoints, the demo, the demo pipeline), and the run order under xdist (longest first)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# one intra-op thread here (pytest_configure) and in every process a test starts (stages, the CLI, dvc's): the tiny
# models gain nothing from a second thread, and with two xdist workers on two cores, two threads per process
# oversubscribe the CPU (two exact stages at once: 29 s with a thread per core each, 17 s with one)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile a no-op, here and in every process a test starts (the env is inherited): bitsandbytes, which peft
# imports whenever it is installed (a plain LoRA load too), wraps four of its kernels in torch.compile at import, and
# that call alone loads torch's inductor compiler: 1.2-1.8 s of CPU in each process that loads an adapter (of a stage's
# ~7). Nothing the tests run is compiled: the library never calls torch.compile, and the wrapped kernels are
# bitsandbytes' fallbacks the tiny CPU models never reach (no dynamo frame in the QLoRA tests without this line).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_configure(config):
    """One intra-op thread in this process too, where it runs tests: not in xdist's controller, which runs none and
    would only delay starting the workers by importing torch (~1.8 s)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from entropy_probe.tiny import build_tokenizer

    return build_tokenizer()


def make_lora_model(seed: int = 0, rank: int = 2, hidden_size: int = 32, head_scale: float = 1.0):
    """Tiny Qwen2 + LoRA adapter with non-zero B (so both A and B get gradients), eval mode, fp32.

    head_scale multiplies the LM head: 40 makes the policy far from uniform (at the uniform maximum ∇H
    vanishes and ΔH is second order), the model most estimator tests use."""
    import torch
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


FULL_RUN = {  # 4 GRPO steps on every parameter of a tiny Qwen2 with a tied head, saved each step
    "finetune": "full",
    "tie_word_embeddings": True,
    "max_operand": 3,
    "hidden_size": 32,
    "warmup_steps": 40,
    "rl_steps": 4,
    "save_steps": 1,
    "prompts_per_step": 4,
    "num_generations": 4,
    "rl_lr": 3e-3,
}


@pytest.fixture(scope="session")
def full_run(tmp_path_factory) -> Path:
    """The demo stage's output for FULL_RUN: a real TRL full fine-tuning run (built once per run; read-only)."""
    from entropy_probe.params import validate_params
    from stages import demo as demo_stage

    def build(folder: Path) -> None:
        demo_stage.run(validate_params({"demo": FULL_RUN}), folder / "demo", dry_run=False)

    return build_once(tmp_path_factory, "full_run", build) / "demo"


BIN = Path(sys.executable).parent


def console_scripts_installed() -> bool:
    return (BIN / "dvc").exists() and (BIN / "entropy-probe").exists()


def repo_env(**extra: str) -> dict[str, str]:
    """The environment the end-to-end tests run dvc and the console script in: the venv's bin first, offline."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", **extra}


def shrink_to_ci_scale(params: dict) -> dict:
    """params.yaml at the scale the end-to-end tests run the pipeline (most of a stage's cost is its process's start,
    so fewer stage runs matter most): smaller batches, fewer step sizes, one probed checkpoint (step6, the sampler,
    the one the README's commands use; test_reuse.py adds another, probed with importance weights), the trajectory
    scoring one step of the run with a smaller E batch."""
    params["batch_config"].update(B_E=24, B_U=4)
    params["truth"]["eta_multipliers"] = [0.5, 1.0]
    params["exact"]["eta_multipliers"] = [0.5, 1.0]
    params["probe"]["checkpoints"] = {"step6": "data/demo/run/checkpoint-6"}
    params["trajectory"].update(steps=[6], B_E=16, trainer_draws=4)
    return params


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory) -> Path:
    """The demo pipeline after `make demo`, built once per run (minutes): a folder holding
    - repo/: a git-initialised copy of the repository in which `dvc repro` ran every stage at CI scale
      (shrink_to_ci_scale), its results committed as in a user's clone (`dvc exp run` / `dvc metrics diff` need one);
    - repro.log: what `dvc repro` printed (which stages it ran);
    - params_reads.jsonl: the params keys every stage read (ENTROPY_PROBE_RECORD_PARAMS), one line per stage run.
    Read-only: a test runs dvc in its own copy (copy_demo_repo)."""
    if not console_scripts_installed():
        pytest.skip("dvc / entropy-probe console scripts not installed in this environment")
    return build_once(tmp_path_factory, "demo_pipeline", _build_demo_pipeline)


def _build_demo_pipeline(folder: Path) -> None:
    repo = folder / "repo"
    copy_repo(repo)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    params_path = repo / "params.yaml"
    params_path.write_text(yaml.safe_dump(shrink_to_ci_scale(yaml.safe_load(params_path.read_text())), sort_keys=False))
    env = repo_env(ENTROPY_PROBE_RECORD_PARAMS=str(folder / "params_reads.jsonl"))  # outside the repo: no stage owns it
    out = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"`dvc repro` exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    (folder / "repro.log").write_text(out.stdout)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "demo"], cwd=repo, check=True, capture_output=True)


def copy_demo_repo(demo_pipeline: Path, dest: Path) -> Path:
    """A private copy of demo_pipeline's repository (work tree, git, DVC cache and lock, data/) at `dest`."""
    shutil.copytree(demo_pipeline / "repo", dest, symlinks=True, dirs_exist_ok=True)
    return dest


def _start_ranks(items: list[pytest.Item]) -> dict[pytest.Item, int]:
    """Each item's place in the run order:
    0: the first test that needs demo_pipeline (the README's experiment commands: it builds it, then minutes of
       commands);
    1: the other end-to-end tests (dvc, torchrun, the CLI in fresh processes: tens of seconds each);
    2: the rest, the other tests that need demo_pipeline among them, where they are collected: behind the
       end-to-end tests and the modules before theirs, so that it is built when a worker picks them up (no worker
       idles on its lock while another builds it), yet not last (a test of a minute picked up last would run alone
       while the other worker has nothing left)."""
    users = [item for item in items if "demo_pipeline" in getattr(item, "fixturenames", ())]
    ranks = {item: 1 if item.get_closest_marker("e2e") else 2 for item in items}
    ranks.update({item: 2 for item in users[1:]})
    ranks.update({item: 0 for item in users[:1]})
    return ranks


def pytest_collection_modifyitems(config, items):
    """Under xdist, the longest tests first (a stable sort: the order is otherwise kept): a test of minutes picked up
    last would run alone long after the others finished; started first, the short tests fill the other worker.
    The scheduler keeps this order with --dist loadscope --no-loadscope-reorder (the Makefile's test target)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        ranks = _start_ranks(items)
        items.sort(key=ranks.__getitem__)
