"""compute.shard fsdp: delta-h1 on a policy sharded by torch's FSDP2 under torchrun (gloo on CPU) gives the
one-process results (δH₁, SEs, δH₂, X̄, Δθ, attributions), on verl FSDP2 checkpoints (full and LoRA,
tests/fixtures/verl); its bars pass exact enumeration; the in-memory `Probe` under the same torchrun gives the stage's
numbers; the pieces (padded microbatches, the stand-in row, each rank's rows of the moments) and the refusals.

The one-process runs use SE_U by the delta method (compute.u_gradient_cache_mb 0), as the sharded mode does, so
every number is comparable. The 2-process runs (full, LoRA) share one torchrun and the 4-process run another
(tests/torchrun_stages.py); the 4-process run cuts E into microbatches of 4 rows, so its shares of 13 and 12 rows
take 4 and 3 microbatches: the shorter ones run a padding microbatch.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import assert_same_delta_h1, torchrun  # noqa: E402
from tolerances import FP32_REL, assert_close_scaled  # noqa: E402

from entropy_probe import distributed, tiny  # noqa: E402
from entropy_probe.artifacts.samples import Samples  # noqa: E402
from entropy_probe.policy import token_budget_slices  # noqa: E402
from entropy_probe.scoring import Batch  # noqa: E402
from stages.cli import app  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "verl"
B_E, B_U, G = 50, 4, 4
ROW_LEN = 4 + 3  # the arithmetic:3 prompts ("2+1=") and max_new_tokens 3
RUNS = ("full_w2", "lora_w2")


def _params(root: Path, run: str) -> dict:
    return {
        "paths": {k: str(root / run / k) for k in ("verify", "sample_e", "sample_u", "delta_h1", "exact")},
        "checkpoint": {"path": str(FIXTURES / run / "global_step_1" / "actor"), "dtype": "fp32", "device_map": "cpu"},
        "batch_config": {
            "dataset_name": "arithmetic:3",
            "B_E": B_E,
            "B_U": B_U,
            "G": G,
            "reward_fn": "test_distributed:parity_reward",
        },
        "generation": {"max_new_tokens": 3},
        "second_order": {"enabled": True, "fd_eps": 0.01},
        "compute": {"u_gradient_cache_mb": 0},
        "exact": {"eta_multipliers": [1.0], "fd_eps": 1e-4},
    }


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """root/RUN/: verify, samples and the one-process delta-h1 of each verl run; root/two/RUN, root/four/full_w2:
    the sharded delta-h1 runs on the same samples."""
    root = tmp_path_factory.mktemp("sharded")
    for run in RUNS:
        params_file = root / f"{run}.yaml"
        params_file.write_text(yaml.safe_dump(_params(root, run)))
        for stage in ("verify", "sample-e", "sample-u", "delta-h1"):
            result = _cli(stage, "--params", str(params_file))
            assert result.exit_code == 0, (stage, result.output)

    def sharded(run: str, out: Path, *extra: str) -> list[str]:
        return [
            "delta-h1",
            "--params",
            str(root / f"{run}.yaml"),
            "-S",
            "compute.shard=fsdp",
            *extra,
            "--out",
            str(out),
        ]

    api = ["--call", "test_sharded:probe_api_under_torchrun", str(root / "full_w2.yaml"), str(root / "api.json")]
    runs = [*(sharded(run, root / "two" / run) for run in RUNS), api]
    torchrun(2, json.dumps(runs), module="torchrun_stages")
    small = ("-S", f"compute.max_tokens_per_microbatch={4 * ROW_LEN}")
    torchrun(4, json.dumps([sharded("full_w2", root / "four" / "full_w2", *small)]), module="torchrun_stages")
    return root


def probe_api_under_torchrun(params_file: str, out: str) -> None:
    """On every rank of a torchrun: `Probe.from_verify` with compute.shard fsdp, then δH₁ through the in-memory API;
    rank 0 writes its numbers to `out`, with the one-line errors the sharded Probe gives for sampling and exact."""
    from entropy_probe.errors import ProbeError
    from entropy_probe.params import load_params
    from entropy_probe.probe import Probe

    params = load_params(Path(params_file), ["compute.shard=fsdp"])
    probe = Probe.from_verify(params)
    E = Samples.read(params.paths.sample_e, "samples_e")
    U = Samples.read(params.paths.sample_u, "samples_u")
    result = probe.delta_h1(E, U)
    errors = {}
    for name, call in (("sample", probe.sample_e), ("exact", lambda: probe.exact(E, result))):
        try:
            call()
        except ProbeError as exc:
            errors[name] = str(exc)
    if distributed.is_rank0():
        numbers = {"delta_h1": result.delta_h1, "se": result.se, "bars": sorted(result.bars.xbar)}
        Path(out).write_text(json.dumps({**numbers, "errors": errors}))
    else:
        assert result.bars is None  # only rank 0 holds X̄ and Δθ whole


def _contributions(directory: Path) -> torch.Tensor:
    rows = csv.DictReader(io.StringIO((directory / "attributions.csv").read_text()))
    return torch.tensor([float(r["contribution"]) for r in rows], dtype=torch.float64)


@pytest.mark.e2e
@pytest.mark.numerics
@pytest.mark.parametrize(
    "world, run", [(2, "full_w2"), (2, "lora_w2"), (4, "full_w2")], ids=["2 full", "2 lora", "4 full"]
)
def test_sharded_delta_h1_equals_one_process(runs, world, run):
    """δH₁, SE_E, SE_U, the parts, norms, X̄ and Δθ (bars) and every attribution of the sharded run equal the
    one-process run's to float32 rounding of their scale; the report says it was sharded."""
    out = runs / {2: "two", 4: "four"}[world] / run
    # each process sums other microbatches of rows (4 rows each at W = 4) in float32: through Adam's per-element
    # normalisation Δθ differs by up to 2.1e-5 of its norm on the default (non-AVX) kernels; X̄ and δH₁ by FP32_REL
    report = assert_same_delta_h1(out, runs / run / "delta_h1", world, 1 + B_U + B_E, delta_theta_rel=1e-4)
    assert report["shard"] == "fsdp" and report["se_U_method"] == "delta method"
    assert report["se_U"] > 0 and report["norm_g"] > 0  # the U pass carries signal
    assert (report["norm_g"] > 1.0) == (run == "full_w2")  # the full run's ‖g‖ is clipped: the norm over shards
    one = json.loads((runs / run / "delta_h1" / "delta_h1.json").read_text())
    assert one["shard"] == "none" and one["update"]["max_grad_norm"] == 1.0
    mine, theirs = _contributions(out), _contributions(runs / run / "delta_h1")
    dot_scale = one["norm_xbar"] * one["norm_delta_theta"]
    assert_close_scaled(mine, theirs, float(theirs.abs().sum()) + dot_scale, what="attributions")
    # δH₂ from the shards moved in place to θ ± εΔθ: a difference of two δH₁-like values over 4ε
    second, second_one = report["second_order"], one["second_order"]
    fd_scale = dot_scale / (4 * second_one["fd_eps"])
    for key in ("delta_h2", "se_delta_h2"):
        assert_close_scaled(second[key], second_one[key], fd_scale, what=key)
    assert_close_scaled(second["delta_h1"], second_one["delta_h1"], dot_scale, what="second_order.delta_h1")
    for key in ("ess_fraction_plus", "ess_fraction_minus"):
        assert second[key] == pytest.approx(second_one[key], rel=FP32_REL)


@pytest.mark.e2e
def test_the_in_memory_api_gives_the_stage_numbers(runs):
    """Probe.from_verify + delta_h1 under the same torchrun gives the delta-h1 stage's sharded numbers; sampling and
    exact on the sharded Probe are one-line errors."""
    api = json.loads((runs / "api.json").read_text())
    stage = json.loads((runs / "two" / "full_w2" / "delta_h1.json").read_text())
    assert (api["delta_h1"], api["se"]) == (stage["delta_h1"], stage["se_delta_h1"])
    verify = json.loads((runs / "full_w2" / "verify" / "verify.json").read_text())
    assert api["bars"] == sorted(p["name"] for p in verify["parameters"])  # whole X̄ of every parameter on rank 0
    assert "sampling" in api["errors"]["sample"] and "compute.shard fsdp" in api["errors"]["exact"]


def test_the_four_process_run_pads_microbatches():
    """The premise of the 4-process parity run: its E shares take different numbers of microbatches."""
    counts = {len(token_budget_slices(s.stop - s.start, ROW_LEN, 4 * ROW_LEN)) for s in _shares(B_E, 4)}
    assert counts == {3, 4}


@pytest.mark.e2e
@pytest.mark.parametrize("run", RUNS)
def test_sharded_bars_pass_exact_enumeration(runs, run):
    """exact (one process) on the 2-process sharded delta-h1's bars and report: |z| < 3 against enumeration over the
    prompt population, and the finite-difference check of ∇H·Δθ."""
    out = runs / "exact" / run
    args = ["exact", "--params", str(runs / f"{run}.yaml"), "-S", f"paths.delta_h1={runs / 'two' / run}"]
    result = _cli(*args, "--out", str(out))
    assert result.exit_code == 0, result.output
    exact = json.loads((out / "exact.json").read_text())
    target = exact["targets"][exact["configured_target"]]
    assert abs(target["z_population"]) < 3 and target["rel_err_fd"] < 1e-4, target


# ---------------------------------------------------------------------------------------------- the pieces


def _shares(n: int, world: int) -> list[slice]:
    return [distributed.row_slice(n, r, world) for r in range(world)]


def _batch(n: int, cols: int = 6, n_resp: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(0)
    return Batch(
        input_ids=torch.randint(0, 14, (n, cols), generator=gen),
        attention_mask=torch.ones(n, cols, dtype=torch.long),
        mask=torch.ones(n, n_resp, dtype=torch.bool),
        n_prompt_cols=cols - n_resp,
        temperature=1.0,
        top_p=1.0,
        tensors={},
    )


@pytest.mark.parametrize("n, world, per", [(11, 3, 2), (13, 4, 4), (3, 4, 1), (8, 2, 4)])
def test_fsdp_microbatches_are_as_many_on_every_process(monkeypatch, n, world, per):
    """Under FSDP every process runs the same number of microbatches: its own rows in order, then empty ones."""
    batch, counts, rows = _batch(n), set(), []
    batch.fsdp = True
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for share in _shares(n, world):
        batch.shard = share
        got = batch.slices(per * 6)
        counts.add(len(got))
        real = [s for s in got if s.stop > s.start]
        assert got[: len(real)] == real and all(s.stop - s.start <= per for s in real)
        rows += [i for s in real for i in range(s.start, s.stop)]
    assert len(counts) == 1 and rows == list(range(n))
    batch.fsdp = False  # the replicated mode keeps each process's own count
    assert [len(batch.slices(per * 6)) for batch.shard in _shares(n, world)] == [
        len(token_budget_slices(s.stop - s.start, 6, per * 6)) for s in _shares(n, world)
    ]


def test_an_empty_microbatch_scores_a_stand_in_row_to_no_rows():
    """The padding microbatch runs the model (FSDP's collectives need the passes) but contributes nothing: no rows,
    and an exactly zero gradient through a connected graph."""
    model = tiny.build_model(num_layers=1, hidden_size=16).double()
    batch = _batch(3)
    stats = batch.score(model, slice(2, 2), coefs=(torch.ones(3, 3).double(), torch.ones(3, 3).double()))
    assert stats.logprobs.shape == (0, 3) and stats.surrogate.shape == (0, 3) and stats.mask.shape == (0, 3)
    grads = torch.autograd.grad(stats.surrogate.sum(), list(model.parameters()), allow_unused=True)
    assert all(g is not None and not g.any() for g in grads)
    full = batch.score(model, slice(0, 1), coefs=(torch.ones(3, 3).double(), torch.ones(3, 3).double()))
    assert full.surrogate.abs().sum() > 0  # the same row with its coefficients does move θ


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals_are_one_line(runs, tmp_path):
    """One process, δH₂ on, what-if rows, an observed step: each a one-line error naming the setting, nothing
    written."""
    params = str(runs / "full_w2.yaml")
    cases = [
        (["delta-h1", "-S", "compute.shard=fsdp"], "this is one process"),
        (["delta-h1", "-S", "compute.shard=fsdp", "-S", "compute.all_targets=true"], "compute.all_targets"),
        (["delta-h1", "-S", "compute.shard=fsdp", "-S", "update.rule=observed"], "observed step"),
        (["whatif", "-S", "compute.shard=fsdp", "-S", f"paths.delta_h1={runs / 'full_w2' / 'delta_h1'}"], "what-if"),
    ]
    for i, (args, phrase) in enumerate(cases):
        out = tmp_path / str(i)
        result = _cli(*args[:1], "--params", params, *args[1:], "--out", str(out))
        assert result.exit_code != 0 and phrase in result.output, (args, result.output)
        assert "compute.shard" in result.output and not out.exists()


def test_each_process_reads_only_its_rows_of_the_moments(runs, monkeypatch):
    """verify's AdamW state read for rank r of W: each moment's torch.chunk rows (FSDP2's Shard(0)), the step whole;
    the W shares put together are the whole state."""
    from entropy_probe import sharded
    from entropy_probe.artifacts.verify import read_verify

    _, whole = read_verify(runs / "full_w2" / "verify")
    for world in (2, 3, 4):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        shares = []
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            shares.append(read_verify(runs / "full_w2" / "verify", sharded.moment_rows)[1])
        for name, moment in whole.exp_avg_sq.items():
            pieces = [s.exp_avg_sq[name] for s in shares]
            assert [p.shape[0] for p in pieces] == [len(c) for c in torch.chunk(moment, world)] + [0] * (
                world - len(torch.chunk(moment, world))
            )
            assert torch.equal(torch.cat(pieces), moment), name
        assert all(s.sharded and s.step == whole.step for s in shares) and not whole.sharded


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 16, 17])
def test_shard_rows_are_torch_chunk_split(monkeypatch, n, world):
    """FSDP2's Shard(0) split is torch.chunk's: ⌈n/W⌉ rows per rank in order, trailing ranks empty when n < W."""
    from entropy_probe import sharded

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    chunks = [c.tolist() for c in torch.chunk(torch.arange(n), world)] if n else []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        assert list(range(n))[sharded.shard_rows(n)] == (chunks[rank] if rank < len(chunks) else [])
