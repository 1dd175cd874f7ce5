"""Overhead of `EntropyProbeCallback` inside the demo's real TRL GRPO run (results: bench/README.md).

    python bench/callback_bench.py [--every 1] [--forecast-draws 0] [--out bench/results/callback_demo.json]

Trains the embedded demo twice with the same seed — without the callback and with it every `--every` steps, with
params.yaml's knobs (B_E, B_U, second order) — and reports, measured in the same process:

    probe_per_train_step = mean seconds of a probe step (its own `entropy_probe/seconds`)
                           / mean seconds of a training step (the GRPO phase of the run without it ÷ its steps)
    every_for_10_percent = the smallest k with probe_per_train_step / k ≤ 0.1

and whether the two runs' final adapters are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_probe.demo import build_demo  # noqa: E402
from entropy_probe.integrations.trl import EntropyProbeCallback  # noqa: E402
from entropy_probe.params import load_params  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--forecast-draws", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/callback_demo.json"))
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        plain, probed = Path(tmp) / "plain", Path(tmp) / "probed"
        params.batch_config.dataset_name = str(probed / "prompts.jsonl")
        report = build_demo(params.demo, plain, plain)
        callbacks = []

        def attach(trainer):
            cb = EntropyProbeCallback(trainer, args.every, params, forecast_draws=args.forecast_draws)
            callbacks.append(cb)
            trainer.add_callback(cb)

        start = time.perf_counter()
        build_demo(params.demo, probed, probed, on_trainer=attach)
        wall_probed = time.perf_counter() - start
        final = f"checkpoint-{params.demo.rl_steps}"
        a, b = (load_file(d / "run" / final / "adapter_model.safetensors") for d in (plain, probed))
        identical = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    probe_seconds = [r["entropy_probe/seconds"] for r in callbacks[0].history]
    train_step = report.seconds["grpo"] / params.demo.rl_steps
    ratio = sum(probe_seconds) / len(probe_seconds) / train_step
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "every": args.every,
        "forecast_draws": args.forecast_draws,
        "B_E": params.batch_config.B_E,
        "B_U": params.batch_config.B_U,
        "second_order": params.second_order.enabled,
        "train_step_seconds": train_step,
        "probe_step_seconds": probe_seconds,
        "probe_per_train_step": ratio,
        "every_for_10_percent": max(1, math.ceil(10 * ratio - 1e-9)),
        "wall_probed_run_seconds": wall_probed,
        "identical_final_adapter": identical,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "probe_step_seconds"}, indent=2))
    return result


if __name__ == "__main__":
    main()
