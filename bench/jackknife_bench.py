"""The jackknife's cost (`update.leave_one_group_out`, docs/math.md §5.2) at full-parameter sizes, in one run:

    python bench/jackknife_bench.py [--params 20000000] [--groups 8] [--out bench/results/jackknife_bench.json]

    per_group_loop = t(for each group b: g₋b = (g − g_b)·D/(D − D_b) whole, X̄·update_direction(g₋b))
    batched        = t(leave_one_group_out: all groups at once, slice by slice over the parameters)
    speedup        = per_group_loop / batched,   and the largest relative difference of the B values

with clipping off and on (every g₋b clipped), AdamW state like a Trainer's (per-element state, shared
hyperparameters as expanded views), g_b float32 as the U pass keeps them, one thread. The median of 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_probe.update import AdamState, leave_one_group_out, update_direction  # noqa: E402


def per_group_loop(g, g_groups, denominators, xbar, state, clip) -> torch.Tensor:
    total = denominators.sum()
    values = []
    for b in range(g_groups.shape[0]):
        g_minus = (g - g_groups[b].double()) * (total / (total - denominators[b]))
        values.append((xbar * update_direction("adam_step", g_minus, state, clip)).sum())
    return torch.stack(values)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=20_000_000)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench/results/jackknife_bench.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, d = args.params, torch.float64
    gen = torch.Generator().manual_seed(0)
    shared = lambda v: torch.full((1,), v, dtype=d).expand(n)  # noqa: E731
    state = AdamState(
        theta=torch.randn(n, generator=gen, dtype=d),
        exp_avg=1e-3 * torch.randn(n, generator=gen, dtype=d),
        exp_avg_sq=1e-6 * torch.rand(n, generator=gen, dtype=d),
        step=shared(5.0),
        lr=shared(1e-3),
        beta1=shared(0.9),
        beta2=shared(0.999),
        eps=shared(1e-8),
        weight_decay=shared(0.01),
    )
    g_groups = 1e-3 * torch.randn(args.groups, n, generator=gen)
    g = g_groups.double().sum(0)
    xbar = torch.randn(n, generator=gen, dtype=d)
    denominators = torch.rand(args.groups, generator=gen, dtype=d) + 1
    rows = {}
    for label, clip in (("no_clipping", None), ("clipping", 1e-4)):
        loops, batched = [], []
        for _ in range(3):  # interleaved rounds
            t_loop, a = timed(per_group_loop, g, g_groups, denominators, xbar, state, clip)
            t_batched, b = timed(leave_one_group_out, "adam_step", g, g_groups, denominators, xbar, state, clip)
            loops.append(t_loop)
            batched.append(t_batched)
        rows[label] = {
            "per_group_loop_s": statistics.median(loops),
            "batched_s": statistics.median(batched),
            "speedup": statistics.median(loops) / statistics.median(batched),
            "max_rel_diff": float(((a - b).abs() / a.abs()).max()),
        }
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "load_avg": os.getloadavg()},
        "params": n,
        "groups": args.groups,
        **rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
