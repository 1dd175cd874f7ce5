"""Multi-process runs (torchrun, gloo on CPU): the same artifacts and the same δH₁ as one process.

The parity tests compare two-process stage runs with the single-process stage run in this process on the same
inputs: tensors, not bytes (the headers record world_size). The two-process runs (sample-e, sample-u, delta-h1 and
delta-h1 on samples recorded as drawn by another checkpoint) are made by one torchrun, `python -m
torch.distributed.run --nproc_per_node=2 -m torchrun_stages …` in a subprocess (OMP_NUM_THREADS=1, a free port, a
generous hang guard so a gloo deadlock fails instead of blocking CI): each rank runs the console script's commands
one after another in the library's process group (tests/torchrun_stages.py), so the interpreter and the libraries
start once, not once per stage. The error test runs the console script itself, `-m stages.cli STAGE …`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import FP32_REL, assert_close_scaled  # noqa: E402

from entropy_probe import distributed, files, outputs  # noqa: E402
from entropy_probe.artifacts.samples import Samples  # noqa: E402
from entropy_probe.params import validate_params  # noqa: E402
from entropy_probe.policy import token_budget_slices  # noqa: E402
from entropy_probe.scoring import Batch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")

REPO = Path(__file__).resolve().parents[1]
# a hang guard only: a healthy 2-process run takes seconds (a minute on a slow, loaded machine); a gloo deadlock must
# fail rather than block CI forever
HANG_GUARD_S = 30 * 60


def parity_reward(response: str, answer) -> float:
    """A reward that varies within groups even for an untrained model (so g, SE_U, attributions ≠ 0)."""
    return float(len(response) % 2)


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("n", [0, 1, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_row_slices_partition_the_rows(n, world):
    """Contiguous, in rank order, disjoint, covering range(n), sizes differing by at most one."""
    parts = [distributed.row_slice(n, r, world) for r in range(world)]
    assert [i for s in parts for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        distributed.row_slice(n, world, world)


def test_helpers_are_the_identity_in_one_process():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.tensor([1.5, 2.5])
    assert distributed.all_reduce_sum(x) is x and torch.equal(x, torch.tensor([1.5, 2.5]))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_objects_to_rank0(3) == [3]
    assert distributed.on_rank0(lambda: 7) == 7
    assert distributed.gather_results_to_rank0(lambda: 7) == [7]
    with pytest.raises(KeyError):  # an error in one process is raised as is
        distributed.on_rank0(lambda: {}["missing"])
    with distributed.process_group("cpu"):  # WORLD_SIZE unset: no process group
        assert not torch.distributed.is_initialized()


def test_sharded_microbatches_cover_the_shard_only():
    n, cols = 11, 6
    batch = Batch(
        input_ids=torch.zeros(n, cols, dtype=torch.long),
        attention_mask=torch.ones(n, cols, dtype=torch.long),
        mask=torch.ones(n, 3, dtype=torch.bool),
        n_prompt_cols=3,
        temperature=1.0,
        top_p=1.0,
        tensors={},
    )
    assert batch.slices(20) == token_budget_slices(n, cols, 20)  # unsharded: unchanged
    for world in (2, 3):
        rows = []
        for r in range(world):
            batch.shard = distributed.row_slice(n, r, world)
            got = batch.slices(20)
            assert all(s.stop - s.start <= 3 for s in got)  # 20 // 6 rows per microbatch
            rows += [i for s in got for i in range(s.start, s.stop)]
        assert rows == list(range(n))


# ---------------------------------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, ok: bool = True, module: str = "stages.cli") -> subprocess.CompletedProcess:
    """`entropy-probe ARGS` (`python -m MODULE ARGS`) under torchrun with gloo on CPU; fails the test on a hang,
    and unless ok=False on a non-zero exit."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        module,
        *args,
    ]
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun hung for {HANG_GUARD_S}s: {' '.join(cmd)}\n{exc.stderr}")
    assert (out.returncode == 0) == ok, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr[-4000:]}"
    assert "terminate called" not in out.stderr  # the gloo abort of a process group left alive at exit
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, trainer_checkpoint):
    """A tiny Trainer checkpoint, its verify report and 1-process sample artifacts; params as a YAML file."""
    from stages import verify
    from stages.sample import run_sample_e, run_sample_u

    root = tmp_path_factory.mktemp("ddp")
    ckpt = trainer_checkpoint(steps=1, total_steps=2, hidden_size=32)  # shared: read only
    tree = {
        "paths": {k: str(root / "one" / k) for k in ("verify", "sample_e", "sample_u", "delta_h1")},
        "checkpoint": {"path": str(ckpt), "dtype": "fp32", "device_map": "cpu", "trust_pickles": True},
        # 13 E rows in 3 generate batches and 4×4 U rows in 4: uneven shares for 2 processes
        "batch_config": {
            "dataset_name": "arithmetic:3",
            "B_E": 13,
            "B_U": 4,
            "G": 4,
            "reward_fn": "test_distributed:parity_reward",
        },
        "generation": {"max_new_tokens": 4, "gen_batch_size": 5},
        "estimator": {"entropy": "token_mean", "baseline": "regression", "crossfit_folds": 3},
        "compute": {"max_tokens_per_microbatch": 40},  # several microbatches per process
    }
    params = validate_params(tree)
    verify.run(params, Path(params.paths.verify), dry_run=False)
    run_sample_e(params, Path(params.paths.sample_e), False)
    run_sample_u(params, Path(params.paths.sample_u), False)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(tree))
    return root, params, params_file


FOREIGN = ("sample_e", "sample_u")  # root / "foreign" / key: the samples recorded as drawn by another checkpoint


@pytest.fixture(scope="module")
def two_process(pipeline) -> Path:
    """root / "two": the two-process runs of sample-e and sample-u (into sample_e/, sample_u/), delta-h1 (delta_h1/)
    and delta-h1 on the samples recorded as drawn by another checkpoint (delta_h1_foreign/; root / "foreign"
    holds them), in one torchrun."""
    root, params, params_file = pipeline
    overrides = []
    for key, kind in zip(FOREIGN, ("samples_e", "samples_u")):
        tensors, meta = files.read_tensors(Path(getattr(params.paths, key)) / "samples.safetensors", kind)
        foreign = root / "foreign" / key
        foreign.mkdir(parents=True)
        files.write_tensors(foreign / "samples.safetensors", tensors, kind, {**meta, "checkpoint_fingerprint": "other"})
        overrides += ["-S", f"paths.{key}={foreign}"]
    two, common = root / "two", ["--params", str(params_file)]
    runs = [
        ["sample-e", *common, "--out", str(two / "sample_e")],
        ["sample-u", *common, "--out", str(two / "sample_u")],
        ["delta-h1", *common, "--out", str(two / "delta_h1")],
        ["delta-h1", *common, *overrides, "--out", str(two / "delta_h1_foreign")],
    ]
    torchrun(2, json.dumps(runs), module="torchrun_stages")
    return two


@pytest.mark.e2e
def test_two_process_sampling_equals_one_process(pipeline, two_process):
    _, params, _ = pipeline
    for kind, key in (("samples_e", "sample_e"), ("samples_u", "sample_u")):
        out = two_process / key
        two = Samples.read(out, kind)  # schema-checked: complete and consistent
        one = Samples.read(getattr(params.paths, key), kind)
        assert two.meta.world_size == 2 and one.meta.world_size == 1
        assert two.meta.model_copy(update={"world_size": 1}) == one.meta
        assert two.tensors().keys() == one.tensors().keys()
        for name, value in one.tensors().items():  # the same draws, the same layout (global P and R), the same rewards
            assert torch.equal(getattr(two, name), value), name
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [outputs.MANIFEST, "samples.json", "samples.safetensors"]
        )


def _delta_h1_outputs(out: Path) -> tuple[dict, dict]:
    bars, _ = files.read_tensors(out / "bars.safetensors", "bars")
    return json.loads((out / "delta_h1.json").read_text()), bars


# δH₁-like results: float32 dot products of X̄ (or the tangents) with an update-sized vector, which may cancel
DOT_KEYS = ("delta_h1", "delta_h1_momentum_part", "delta_h1_naive", "delta_h1_gradient_part_linearised")


def assert_same_delta_h1(
    two: Path, one: Path, world: int = 2, csv_rows: int = 1 + 4 + 13, delta_theta_rel: float = FP32_REL
) -> dict:
    """`world` processes sum in another order than one: float32 results agree to FP32_REL of their scale.

    A δH₁-like value is compared relative to ‖X̄‖‖Δθ‖ (by Cauchy–Schwarz, the largest a dot product of
    X̄ with Δθ can be: the magnitude of its terms), not to itself; norms, SEs and entropies do not cancel.
    `csv_rows`: attributions.csv's lines (header, U groups, E sequences). `delta_theta_rel`: the tolerance of the Δθ
    bars, relative to each tensor's norm (Adam divides each element of g by its own √v, which can magnify the
    rounding of a small, cancelling entry of g beyond FP32_REL of the tensor).
    """
    (s2, bars2), (s1, bars1) = _delta_h1_outputs(two), _delta_h1_outputs(one)
    assert s2["world_size"] == world and s1["world_size"] == 1
    dot_scale = s1["norm_xbar"] * s1["norm_delta_theta"]
    keys = [
        "delta_h1",
        "se_delta_h1",
        "se_E",
        "se_U",
        "entropy",
        "delta_h1_momentum_part",
        "delta_h1_naive",
        "delta_h1_gradient_part_linearised",
        "norm_xbar",
        "norm_g",
        "norm_delta_theta",
    ]
    for key in keys:
        if s1.get(key) is None:  # e.g. the naive estimate without compute.all_targets, SE_U not estimable
            assert s2.get(key) is None, key
            continue
        assert_close_scaled(s2[key], s1[key], dot_scale if key in DOT_KEYS else abs(s1[key]), what=key)
    for target, values in s1["targets"].items():
        # X̄ of another target is ~ the main X̄ × the ratio of the entropies (sequence = token_mean × mean length)
        target_scale = dot_scale * max(1.0, values["entropy"] / s1["entropy"])
        for key, value in values.items():
            scale = target_scale if key in DOT_KEYS else abs(value)
            assert_close_scaled(s2["targets"][target][key], value, scale, what=f"{target}.{key}")
    for key in ("B_E", "B_U", "G", "n_E_tokens", "n_U_tokens"):
        assert s2[key] == s1[key], key
    for key, value in s1["reuse"].items():
        assert s2["reuse"][key] == (
            value if key in ("weighted", "sampler_fingerprint") else pytest.approx(value, rel=FP32_REL)
        )
    assert bars2.keys() == bars1.keys()
    for name in bars1:
        # float32 sums in another order (per-process microbatches): compared as whole tensors
        rel = delta_theta_rel if name.startswith("delta_theta.") else FP32_REL
        assert_close_scaled(bars2[name], bars1[name], float(bars1[name].double().norm()), rel, what=name)
    rows2 = (two / "attributions.csv").read_text().splitlines()
    rows1 = (one / "attributions.csv").read_text().splitlines()
    assert len(rows2) == len(rows1) == csv_rows
    return s2


@pytest.mark.e2e
@pytest.mark.numerics
def test_two_process_delta_h1_equals_one_process(pipeline, two_process):
    from stages import delta_h1

    _, params, _ = pipeline
    delta_h1.run(params, Path(params.paths.delta_h1), dry_run=False)
    s2 = assert_same_delta_h1(two_process / "delta_h1", Path(params.paths.delta_h1))
    assert s2["reuse"]["weighted"] is False
    assert s2["se_U"] > 0 and s2["norm_g"] > 0  # the U passes carry signal, so their parity means something


@pytest.mark.e2e
@pytest.mark.numerics
def test_two_process_reweighted_delta_h1_equals_one_process(pipeline, two_process):
    """Samples recorded as drawn by another checkpoint: the sharded re-scoring pass and the weighted path."""
    from stages import delta_h1

    root, params, _ = pipeline
    one = root / "one" / "delta_h1_foreign"
    p1 = params.model_copy(deep=True)
    p1.paths.sample_e, p1.paths.sample_u = (str(root / "foreign" / key) for key in FOREIGN)
    delta_h1.run(p1, one, dry_run=False)
    s2 = assert_same_delta_h1(two_process / "delta_h1_foreign", one)
    assert s2["reuse"]["weighted"] is True and s2["reuse"]["ess_fraction_E"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.e2e
def test_an_error_in_rank0_work_fails_every_rank_cleanly(pipeline):
    """The plan is made on rank 0 only; its ProbeError reaches every rank (no rank left in a collective)."""
    root, _, params_file = pipeline
    out = root / "two" / "too_many"
    run = torchrun(
        2, "sample-u", "--params", str(params_file), "-S", "batch_config.B_U=1000", "--out", str(out), ok=False
    )
    assert "1000 distinct prompts requested" in run.stderr and "(rank 0)" in run.stderr
    assert not out.exists()


def test_single_process_stages_are_refused_under_torchrun(pipeline, tmp_path, monkeypatch):
    """verify (and the other one-process stages) exits 2 with one line under WORLD_SIZE > 1, writing nothing."""
    from typer.testing import CliRunner

    from stages.cli import app

    _, _, params_file = pipeline
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, ["verify", "--params", str(params_file), "--out", str(tmp_path / "v")])
    assert result.exit_code == 2
    assert "does not run under torchrun (WORLD_SIZE=2)" in result.output and "(rank 1)" in result.output
    assert not (tmp_path / "v").exists() and not torch.distributed.is_initialized()
