"""Per-process peak memory of δH₁ under compute.shard fsdp (FSDP2 over torchrun) against one process.

    python bench/shard_bench.py                                   # CPU, gloo: W = 1, 2, 4 (≈ 5 min on 2 cores)
    python bench/shard_bench.py --worlds 2 --hidden 128 --layers 2 --heads 4 --kv-heads 2 --vocab 2048 \
        --B_E 8 --new-tokens 8 --out /tmp/shard_smoke.json       # a smoke run (≈ 1 min)
    python bench/shard_bench.py --device cuda --worlds 2 4 8 --out bench/results/shard_cuda.json  # W GPUs, nccl

One full-parameter random Qwen2 (every tensor trainable, no adapter: `bench.build_model`), a synthetic AdamW
state after 10 steps in the Trainer's two param groups, and one E and one U sample set drawn once by the product's
own sampler (`Probe.sample_e`, `Probe.sample_u`, a reward that varies within groups) in a subprocess and saved:
every run reads those files and builds the same policy and state from the same seeds. Each run is fresh processes:

    W = 1   python shard_bench.py --worker                     compute.shard none (whole policy and state)
    W ≥ 2   torchrun --nproc_per_node=W shard_bench.py --worker   compute.shard fsdp (about 1/W of them each)

Each process builds the policy and state whole, reads the samples, shards (`probe.update_rule()`; fsdp only),
runs a one-row forward+backward (thread pools, kernel caches, FSDP's lazy init), frees what it can (gc,
malloc_trim), and then measures one `probe.delta_h1(E, U)`: δH₁, SE_E, SE_U by the delta method, attributions and
bars, with `second_order.enabled: false` and `compute.u_gradient_cache_mb: 0` in every run (what the sharded mode
computes). Per process:
  - peak_above_baseline: the call's peak memory above the memory right before it (CPU: VmHWM after resetting it
    through /proc/self/clear_refs, with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS; CUDA:
    max_memory_allocated after reset_peak_memory_stats, above memory_allocated);
  - segments: that peak and the memory held per stretch of the call, between the timed phases of compute_delta_h1
    (its `Clock`) and before the bars (X̄ and Δθ gathered whole onto rank 0 when sharded); peak_estimate_above_baseline
    is the peak before the bars;
  - param_bytes: the parameter-sized tensors held at the baseline (this process's parameters or shards, and the
    AdamW moments or their shards, which stay on the CPU until the update is built); estimate_vector_bytes: the
    flat X̄ and Δθ the estimate returns;
  - delta_h1_s, phases_s: wall times; allocated_after_load and load_peak: before the cut every process holds the
    whole policy and state (loading reads whole tensors).
Ratios peak(W)/peak(W = 1) per process are set beside the ideal 1/W. δH₁, the SEs and the norms of every process of
every W ≥ 2 run are checked against W = 1 to float32 rounding (dot products relative to ‖X̄‖‖Δθ‖ of W = 1, the
others to themselves); a difference beyond it fails the benchmark after the JSON is written.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DTYPES, ROOT, _status_bytes, build_model, environment, plain_forward_backward  # noqa: E402
from entropy_probe import delta_h1 as delta_h1_module  # noqa: E402
from entropy_probe import distributed  # noqa: E402
from entropy_probe.artifacts.samples import Samples  # noqa: E402
from entropy_probe.optimizer_state import OptimizerState, ParamGroup, trainer_param_groups  # noqa: E402
from entropy_probe.params import Params  # noqa: E402
from entropy_probe.probe import Probe  # noqa: E402
from entropy_probe.scoring import Batch  # noqa: E402
from entropy_probe.tiny import CHARS, EOS, PAD  # noqa: E402
from entropy_probe.trainer_config import TrainerConfig, TrainerSettings  # noqa: E402

FP32_REL = 1e-5  # float32 rounding of a sum relative to the magnitude of its terms (tests/tolerances.py)
BF16_REL = 2e-2
DOT_KEYS = ("delta_h1", "delta_h1_momentum_part", "delta_h1_gradient_part_linearised")
CHECK_KEYS = DOT_KEYS + ("se_delta_h1", "se_E", "se_U", "entropy", "norm_xbar", "norm_g", "norm_delta_theta")
FILLER = 0x4E00  # filler tokens are single characters from here on (CJK first): each id decodes to one character
SURROGATES = range(0xD800, 0xE000)  # not characters


# ----------------------------------------------------------------------------- policy, state, samples


def build_tokenizer(vocab: int):
    """A character tokenizer of `vocab` tokens: the arithmetic task's characters, vocab − 16 filler characters,
    eos and pad last (ids vocab − 2 and vocab − 1, as `bench.build_model` configures the model)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = vocab - len(CHARS) - 2
    fillers = [chr(c) for c in range(FILLER, FILLER + n + len(SURROGATES)) if c not in SURROGATES][:n]
    words = CHARS + fillers + [EOS, PAD]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=PAD, padding_side="left"
    )


def model_config(args) -> dict:
    """The shape `bench.build_model` takes: every tensor trainable (full), positions for prompt + response."""
    return dict(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate or 3 * args.hidden,
        vocab=args.vocab,
        tie_word_embeddings=args.tie,
        prompt_len=8,
        new_tokens=args.new_tokens,
        full=True,
    )


def synthetic_adamw(model, seed: int) -> OptimizerState:
    """AdamW after 10 steps in the Trainer's two param groups (decay, no decay), each parameter's moments drawn
    from its own seed (the same in every process)."""
    decay, no_decay = trainer_param_groups(model)
    params = dict(model.named_parameters())
    exp_avg, exp_avg_sq = {}, {}
    for i, name in enumerate(decay + no_decay):
        gen = torch.Generator().manual_seed(seed + i)
        exp_avg[name] = 1e-3 * torch.randn(params[name].shape, generator=gen)
        exp_avg_sq[name] = 1e-6 * torch.rand(params[name].shape, generator=gen)
    groups = [
        ParamGroup(lr=1e-5, betas=[0.9, 0.999], eps=1e-8, weight_decay=wd, names=names)
        for wd, names in ((0.01, decay), (0.0, no_decay))
    ]
    step = {n: 10.0 for n in decay + no_decay}
    return OptimizerState(decay + no_decay, exp_avg, exp_avg_sq, step, groups, "shard_bench: synthetic")


def probe_params(args, shard: str) -> Params:
    """The probe's settings: the arithmetic prompts, the bench's batch sizes, and what the sharded mode computes
    (no δH₂, SE_U by the delta method) in every run."""
    params = Params()
    params.batch_config.dataset_name = "arithmetic:9"
    params.batch_config.B_E, params.batch_config.B_U, params.batch_config.G = args.B_E, args.B_U, args.G
    params.generation.max_new_tokens = args.new_tokens
    params.second_order.enabled = False
    params.compute.u_gradient_cache_mb = 0
    params.compute.all_targets = False
    params.compute.shard = shard
    return params


def parity_reward(prompts, responses, answers, completion_ids) -> list[float]:
    """A reward that varies within groups under a random policy (so g, SE_U and the attributions are not zero)."""
    return [float(sum(int(t) for t in ids) % 2) for ids in completion_ids]


def make_probe(args, device: str, shard: str, reward=None) -> Probe:
    """The policy on `device` with its AdamW state; the state is built inline so that no reference to the whole
    moments outlives the cut to this process's shards."""
    model = build_model(model_config(args), device, DTYPES[args.dtype], qlora=False, seed=args.seed)
    trainer = TrainerSettings(TrainerConfig(loss_type="dapo", max_grad_norm=1.0, temperature=1.0))
    tokenizer = build_tokenizer(args.vocab)
    return Probe(
        model, tokenizer, synthetic_adamw(model, args.seed + 1), trainer, probe_params(args, shard), reward=reward
    )


def sample_stage(args) -> None:
    """Subprocess entry (--stage sample): draw E and U once with the product's sampler and save them."""
    torch.set_num_threads(args.threads)
    probe = make_probe(args, device_for(args, local_rank=0), "none", reward=parity_reward)
    E, U = probe.sample_e(seed=11), probe.sample_u(seed=12)
    moving = int((U.advantages.view(-1, args.G).abs().sum(1) > 0).sum())
    if moving < 2:
        raise SystemExit(f"only {moving} U groups with non-zero advantages: SE_U not estimable; change --seed")
    E.write(Path(args.samples) / "E")
    U.write(Path(args.samples) / "U")


# ----------------------------------------------------------------------------- memory


class CpuMemory:
    """RSS of this process: `reset` frees what can be freed and restarts VmHWM at the current RSS."""

    def allocated(self) -> int:
        return _status_bytes("VmRSS")

    def peak_so_far(self) -> int:
        return _status_bytes("VmHWM")

    def restart_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM ← VmRSS (Linux ≥ 4.0)

    def reset(self) -> int:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.restart_peak()
        return self.allocated()

    def sync(self) -> None:
        pass


class CudaMemory:
    """torch's allocations on this process's GPU: `reset` restarts max_memory_allocated at memory_allocated."""

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def peak_so_far(self) -> int:
        return torch.cuda.max_memory_allocated()

    def restart_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def reset(self) -> int:
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.restart_peak()
        return self.allocated()

    def sync(self) -> None:
        torch.cuda.synchronize()


class Segments:
    """Peak and held memory per segment of one call, above `base`: `mark(name)` closes the segment that ends
    there (its peak since the previous mark, what is allocated at its end) and restarts the peak. The call's
    peak is the largest segment peak."""

    def __init__(self, meter, base: int, start: float) -> None:
        self.meter, self.base, self.start, self.rows, self.peaks = meter, base, start, [], []

    def mark(self, name: str) -> None:
        self.meter.sync()
        peak, held = self.meter.peak_so_far(), self.meter.allocated()
        self.meter.restart_peak()
        now = round(time.perf_counter() - self.start, 3)
        self.rows.append(
            {"until": name, "peak_MiB": mib(peak - self.base), "held_MiB": mib(held - self.base), "t_s": now}
        )
        self.peaks.append(peak)

    def peak_until(self, name: str) -> int:
        """The peak from the start to the end of the first segment named `name` (bytes, absolute)."""
        return max(self.peaks[: [r["until"] for r in self.rows].index(name) + 1])


@contextlib.contextmanager
def marked_phases(segments: Segments, probe: Probe):
    """Inside the block, a segment mark before and after each timed phase of compute_delta_h1 (its `Clock`) and
    before the bars (`probe._bars`): where the peak of δH₁ is reached and what is held between phases."""
    clock_call, build_bars = delta_h1_module.Clock.__call__, probe._bars

    def timed(clock, phase, fn, *a, **k):
        segments.mark(f"start {phase}")
        try:
            return clock_call(clock, phase, fn, *a, **k)
        finally:
            segments.mark(phase)

    def bars(*a, **k):
        segments.mark("estimate done")
        return build_bars(*a, **k)

    delta_h1_module.Clock.__call__, probe._bars = timed, bars
    try:
        yield
    finally:
        delta_h1_module.Clock.__call__ = clock_call
        del probe._bars


def local_bytes(tensors) -> int:
    """Bytes of this process's part of each tensor (an FSDP DTensor's local shard, else the whole tensor)."""
    total = 0
    for t in tensors:
        t = getattr(t, "to_local", lambda t=t: t)()
        total += t.numel() * t.element_size()
    return total


def held_bytes(probe: Probe) -> dict:
    """The parameter-sized tensors the probe holds between calls: parameters and the AdamW moments."""
    held = {
        "params": local_bytes(probe.model.parameters()),
        "exp_avg": local_bytes(probe.optimizer.exp_avg.values()),
        "exp_avg_sq": local_bytes(probe.optimizer.exp_avg_sq.values()),
    }
    return dict(held, total=sum(held.values()))


# ----------------------------------------------------------------------------- one process of one run


def device_for(args, local_rank: int) -> str:
    return f"cuda:{local_rank}" if args.device == "cuda" else "cpu"


def warm_up(probe: Probe, E: Samples) -> None:
    """One row forward+backward through the (sharded) policy on every process: thread pools, kernel caches and
    FSDP's lazy initialisation, so that none of them lands in the measured peak."""
    B = Batch.from_samples(E, probe.device)
    one = Batch(B.input_ids[:1], B.attention_mask[:1], B.mask[:1], B.n_prompt_cols, B.temperature, B.top_p, {})
    plain_forward_backward(probe.model, [one], 4096)


def measure_delta_h1(probe: Probe, E: Samples, U: Samples, meter) -> tuple[dict, object]:
    """probe.delta_h1(E, U): its wall time, its peak above the baseline right before it, and the segments between
    its phases (`marked_phases`)."""
    base = meter.reset()
    start = time.perf_counter()
    segments = Segments(meter, base, start)
    with marked_phases(segments, probe):
        result = probe.delta_h1(E, U)
        segments.mark("bars and attributions")
    wall = time.perf_counter() - start
    peak = max(segments.peaks)
    numbers = {
        "baseline_bytes": base,
        "peak_above_baseline": peak - base,
        "peak_estimate_above_baseline": segments.peak_until("estimate done") - base,
        "peak_bytes": peak,
        "held_after_MiB": segments.rows[-1]["held_MiB"],
        "delta_h1_s": round(wall, 3),
        "estimate_s": next(r["t_s"] for r in segments.rows if r["until"] == "estimate done"),
        "segments": segments.rows,
    }
    return numbers, result


def worker(args) -> None:
    """Process entry (--worker): one rank of one run; writes its numbers to --results/w{W}_rank{r}.json."""
    torch.set_num_threads(args.threads)
    device_map = "cuda" if args.device == "cuda" else "cpu"
    with distributed.process_group(device_map):
        world, rank = distributed.world_size(), distributed.rank()
        meter = CudaMemory() if args.device == "cuda" else CpuMemory()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        start = time.perf_counter()
        probe = make_probe(args, device_for(args, local_rank), "fsdp" if world > 1 else "none")
        loaded = {"allocated_after_load": meter.allocated(), "whole_param_bytes": held_bytes(probe)["total"]}
        E, U = Samples.read(Path(args.samples) / "E", "samples_e"), Samples.read(Path(args.samples) / "U", "samples_u")
        probe.update_rule()  # compute.shard fsdp: shards the policy and cuts the AdamW state (the update is remade)
        warm_up(probe, E)
        loaded["load_peak"], loaded["setup_s"] = meter.peak_so_far(), round(time.perf_counter() - start, 2)
        held = held_bytes(probe)
        numbers, result = measure_delta_h1(probe, E, U, meter)
        est, report = result.estimate, result.report
        record = {
            "world": world,
            "rank": rank,
            "shard": report.shard,
            **numbers,
            **loaded,
            "param_bytes": held,
            "estimate_vector_bytes": {"xbar": local_bytes([est.xbar]), "delta_theta": local_bytes([est.delta_theta])},
            "bars_on_this_rank": result.bars is not None,
            "phases_s": est.timings,
            "report": {k: getattr(report, k) for k in CHECK_KEYS + ("se_U_method", "world_size", "n_E_tokens")},
            "rows": {"E": len(E.input_ids), "U": len(U.input_ids)},
            "parameters": sum(p.numel() for p in probe.model.parameters()),
        }
        Path(args.results, f"w{world}_rank{rank}.json").write_text(json.dumps(record, indent=1))


# ----------------------------------------------------------------------------- the runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forwarded(args) -> list[str]:
    """The options every subprocess shares with this one (shape, batches, device, seeds)."""
    shape = model_config(args)
    out = [
        f"--hidden={args.hidden}", f"--layers={args.layers}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}",
        f"--intermediate={shape['intermediate']}", f"--vocab={args.vocab}", f"--new-tokens={args.new_tokens}",
        f"--B_E={args.B_E}", f"--B_U={args.B_U}", f"--G={args.G}", f"--device={args.device}", f"--dtype={args.dtype}",
        f"--threads={args.threads}", f"--seed={args.seed}",
    ]  # fmt: skip
    return out + ["--tie"] * args.tie


def subprocess_env(threads: int) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MALLOC_MMAP_THRESHOLD_": "65536",  # freed blocks ≥ 64 KiB go back to the OS: RSS follows the live tensors
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def run(cmd: list[str], what: str, threads: int, timeout: float) -> float:
    """Run one subprocess to the end; its wall time, or the end of the benchmark with its output's tail."""
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed (exit {out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    return time.perf_counter() - start


def launch(world: int, args, samples: Path, results: Path) -> list[dict]:
    """One run of `world` processes (W = 1: plain python, compute.shard none; W ≥ 2: torchrun, fsdp); the
    per-rank records in rank order."""
    script = [str(Path(__file__).resolve()), "--worker", f"--samples={samples}", f"--results={results}"]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1"]
        cmd = [sys.executable, *torchrun, "--master_addr=127.0.0.1", f"--master_port={free_port()}", *script]
    wall = run(cmd + forwarded(args), f"the W={world} run", args.threads, args.timeout)
    records = [json.loads((results / f"w{world}_rank{r}.json").read_text()) for r in range(world)]
    for r in records:
        r["process_wall_s"] = round(wall, 1)
    return records


# ----------------------------------------------------------------------------- checks and summary


def library_state() -> dict:
    """What was measured: the commit, the library files that differ from it, and a hash of every library source
    file (compared at the start and the end of the benchmark: a library edited mid-run is flagged)."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((ROOT / "entropy_probe").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "entropy_probe").splitlines(),
        "sources_sha256": digest.hexdigest()[:16],
    }


def parity(one: dict, other: dict, rel: float) -> dict:
    """|x(W) − x(1)| / scale for the checked numbers: dot products against ‖X̄‖‖Δθ‖ of W = 1, others themselves."""
    dot_scale = one["norm_xbar"] * one["norm_delta_theta"]
    out = {}
    for key in CHECK_KEYS:
        a, b = one[key], other[key]
        if a is None or b is None:
            out[key] = None if a is b else float("inf")
            continue
        scale = dot_scale if key in DOT_KEYS else abs(a)
        out[key] = abs(b - a) / scale if scale else float(b != a)
    worst = max((v for v in out.values() if v is not None), default=0.0)
    return {"rel_diff": out, "worst": worst, "tolerance": rel, "ok": worst <= rel}


def summarise(runs: dict[int, list[dict]], rel: float) -> dict:
    """Per run and rank: the measured numbers, the ratios to W = 1 beside 1/W, and the parity check."""
    one = runs[1][0]
    table, checks = [], {}
    for world, records in runs.items():
        for r in records:
            table.append(
                {
                    "world": world,
                    "rank": r["rank"],
                    "baseline_MiB": mib(r["baseline_bytes"]),
                    "peak_above_baseline_MiB": mib(r["peak_above_baseline"]),
                    "peak_estimate_above_baseline_MiB": mib(r["peak_estimate_above_baseline"]),
                    "peak_MiB": mib(r["peak_bytes"]),
                    "load_peak_MiB": mib(r["load_peak"]),
                    "param_bytes_MiB": mib(r["param_bytes"]["total"]),
                    "delta_h1_s": r["delta_h1_s"],
                    "ratio_peak_above_baseline": ratio(r["peak_above_baseline"], one["peak_above_baseline"]),
                    "ratio_peak_estimate": ratio(
                        r["peak_estimate_above_baseline"], one["peak_estimate_above_baseline"]
                    ),
                    "ratio_peak": ratio(r["peak_bytes"], one["peak_bytes"]),
                    "ratio_param_bytes": ratio(r["param_bytes"]["total"], one["param_bytes"]["total"]),
                    "ideal": round(1 / world, 4),
                }
            )
            if world > 1:
                checks[f"w{world}_rank{r['rank']}"] = parity(one["report"], r["report"], rel)
    return {"table": table, "checks": checks}


def mib(x: int) -> float:
    return round(x / 2**20, 1)


def ratio(a: int, b: int) -> float:
    return round(a / b, 4) if b else float("nan")


def print_segments(runs: dict[int, list[dict]]) -> None:
    """Rank 0's peak and held memory (MiB above the baseline) per segment of δH₁, one column per run."""
    worlds = list(runs)
    print("segment of delta_h1 (rank 0) | " + " | ".join(f"W={w} peak / held" for w in worlds))
    for i, seg in enumerate(runs[worlds[0]][0]["segments"]):
        cells = [f"{runs[w][0]['segments'][i]['peak_MiB']} / {runs[w][0]['segments'][i]['held_MiB']}" for w in worlds]
        print(f"{seg['until']} | " + " | ".join(cells))


def print_table(table: list[dict]) -> None:
    cols = [
        ("W", "world"),
        ("rank", "rank"),
        ("base MiB", "baseline_MiB"),
        ("peak−base", "peak_above_baseline_MiB"),
        ("est. peak−base", "peak_estimate_above_baseline_MiB"),
        ("param-sized MiB", "param_bytes_MiB"),
        ("δH₁ s", "delta_h1_s"),
        ("peak ratio", "ratio_peak_above_baseline"),
        ("est. ratio", "ratio_peak_estimate"),
        ("param ratio", "ratio_param_bytes"),
        ("1/W", "ideal"),
    ]
    print(" | ".join(c for c, _ in cols))
    for row in table:
        print(" | ".join(str(row[k]) for _, k in cols))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--worlds", type=int, nargs="*", default=[2, 4], help="process counts of the fsdp runs (none: W = 1 alone)"
    )
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 3 × hidden)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
    ap.add_argument("--new-tokens", type=int, default=24, help="generation.max_new_tokens")
    ap.add_argument("--B_E", type=int, default=16)
    ap.add_argument("--B_U", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    ap.add_argument("--tolerance", type=float, default=None, help="parity (default 1e-5 fp32, 2e-2 bf16/fp16)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/shard_cpu.json"))
    ap.add_argument("--stage", choices=["sample"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--samples", help=argparse.SUPPRESS)
    ap.add_argument("--results", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.tolerance = args.tolerance or (FP32_REL if args.dtype == "fp32" else BF16_REL)
    if any(w < 2 for w in args.worlds):
        ap.error("--worlds are the sharded runs' process counts (≥ 2); W = 1 always runs")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.stage == "sample":
        return sample_stage(args)
    if args.worker:
        return worker(args)
    wall, load_before, library = time.perf_counter(), os.getloadavg(), library_state()
    with tempfile.TemporaryDirectory() as tmp:
        samples, results = Path(tmp) / "samples", Path(tmp) / "results"
        results.mkdir()
        script = [sys.executable, str(Path(__file__).resolve()), "--stage=sample", f"--samples={samples}"]
        sample_s = run(script + forwarded(args), "sampling E and U", args.threads, args.timeout)
        runs = {}
        for world in [1, *args.worlds]:
            runs[world] = launch(world, args, samples, results)
            print(f"W={world}: δH₁ {runs[world][0]['report']['delta_h1']:.6g}, peaks above baseline (MiB) "
                  f"{[mib(r['peak_above_baseline']) for r in runs[world]]}", flush=True)  # fmt: skip
    summary = summarise(runs, args.tolerance)
    one = runs[1][0]
    library["changed_during_run"] = library_state()["sources_sha256"] != library["sources_sha256"]
    report = {
        "what": "per-process peak memory of probe.delta_h1 (δH₁, SE_E, SE_U by the delta method, attributions, "
        "bars), compute.shard none (W=1) vs fsdp (W>=2, torchrun)",
        "summary": summary["table"],
        "checks": summary["checks"],
        "runs": {str(w): recs for w, recs in runs.items()},
        "model": {
            **model_config(args),
            "parameters": one["parameters"],
            "dtype": args.dtype,
            "attn_implementation": "eager",
        },
        "library": library,
        "batches": {"B_E": args.B_E, "B_U": args.B_U, "G": args.G, "rows": one["rows"]},
        "settings": {"second_order.enabled": False, "compute.u_gradient_cache_mb": 0, "threads": args.threads},
        "env": {
            **environment(args.device),
            "threads": args.threads,  # per process (the environment's count is this parent's)
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "backend": "nccl" if args.device == "cuda" else "gloo",
        },
        "sample_s": round(sample_s, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(summary["table"])
    print_segments(runs)
    print(f"wrote {out} ({report['wall_s']} s)")
    if library["changed_during_run"]:
        raise SystemExit("entropy_probe/ changed while the benchmark ran: the runs measured different code; rerun")
    bad = {k: v for k, v in summary["checks"].items() if not v["ok"]}
    if bad:
        raise SystemExit(f"sharded results differ from W=1 beyond {args.tolerance:g}: {json.dumps(bad, indent=1)}")
    print(f"parity: every W ≥ 2 rank equals W=1 within {args.tolerance:g} (worst "
          f"{max((v['worst'] for v in summary['checks'].values()), default=0):.2g})")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
