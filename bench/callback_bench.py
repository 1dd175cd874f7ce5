"""Overhead of `EntropyProbeCallback` inside a real TRL GRPO run (results: bench/README.md).

    python bench/callback_bench.py [--every 1] [--forecast-draws 0] [--out bench/results/callback_demo.json]
    python bench/callback_bench.py --shape qwen2.5-0.5b --layers 1 [--steps 4] [--completion-length 32] \
        [--prompts-per-step 4] [--num-generations 4] [--B-E 64] --out bench/results/callback_qwen05b_1layer.json

Trains twice with the same seed — without the callback and with it every `--every` steps — and reports, measured
in the same process:

    probe_per_train_step = mean seconds of a probe step (its own `entropy_probe/seconds`)
                           / mean seconds of a training step of the run without it
    every_for_10_percent = the smallest k with probe_per_train_step / k ≤ 0.1

and whether the two runs' final trainable weights are bit-identical.

Default (`--shape demo`): the embedded demo (params.yaml's demo and probe knobs: B_E 256, B_U 8, δH₂ on); a
training step is its GRPO phase ÷ its steps. `--shape qwen2.5-0.5b` (bench.py's shape: random weights, no
download, `--layers` keeps fewer decoder layers; bench.py's word-level tokenizer over the 151,936 ids): TRL's
GRPOTrainer (the demo's GRPOConfig: AdamW, linear schedule, use_cpu, report_to none) with LoRA r = 16 on every
linear layer (as bench.py) on random-word prompts, reward = the share of even word ids in the completion
(`even_words`), `--prompts-per-step` × `--num-generations` completions of exactly `--completion-length` tokens
(the random policy almost never samples eos); the probe with params.yaml's knobs but B_E = `--B-E`, B_U = the
trainer's prompts per step, G = its generations, max_new_tokens = its completion length. A training step is the
mean wall time between consecutive `on_step_end`s of the run without the callback. bench.py scales the LM head ×8,
which makes this tied-embedding shape deterministic (every group's completions equal, advantages 0); here it is
scaled ×`--head-scale` (3: per-token entropy 0.5–10 nats) instead. Each probe step's time is also split by phase
(E and U sampling, compute_delta_h1 by its own phases, δH₂, the observed change, the forecast).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench  # noqa: E402
from entropy_probe.demo import build_demo  # noqa: E402
from entropy_probe.integrations.trl import EntropyProbeCallback  # noqa: E402
from entropy_probe.params import load_params  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--forecast-draws", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: bench/results/callback_demo.json (demo shape)")
    ap.add_argument("--shape", choices=["demo", *bench.SHAPES], default="demo")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (bench shapes)")
    ap.add_argument("--steps", type=int, default=4, help="trainer steps (bench shapes; the last is never probed)")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--completion-length", type=int, default=32)
    ap.add_argument("--B-E", type=int, default=64, dest="B_E")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-scale", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (bench shapes)")
    args = ap.parse_args(argv)
    if args.shape == "demo":
        result = run_demo(args)
        out = Path(args.out or ROOT / "bench/results/callback_demo.json")
    else:
        result = run_shape(args)
        out = Path(args.out or ROOT / f"bench/results/callback_{args.shape}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("probe_step_seconds", "probe_phases_s")}, indent=2))
    return result


def summary(probe_seconds: list[float], train_step: float) -> dict:
    ratio = sum(probe_seconds) / len(probe_seconds) / train_step
    return {"probe_per_train_step": ratio, "every_for_10_percent": max(1, math.ceil(10 * ratio - 1e-9))}


# ----------------------------------------------------------------------------------------------------- the demo


def run_demo(args) -> dict:
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
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
        "every": args.every,
        "forecast_draws": args.forecast_draws,
        "B_E": params.batch_config.B_E,
        "B_U": params.batch_config.B_U,
        "second_order": params.second_order.enabled,
        "train_step_seconds": train_step,
        "probe_step_seconds": probe_seconds,
        **summary(probe_seconds, train_step),
        "wall_probed_run_seconds": wall_probed,
        "identical_final_adapter": identical,
    }


# ------------------------------------------------------------------------------------------- a bench.py shape


def even_words(completions: list[str], **_) -> list[float]:
    """TRL reward: the share of the completion's words w<i> with an even i (0 for an empty completion)."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w[:1] == "w" and w[1:].isdigit()]
        out.append(sum(i % 2 == 0 for i in ids) / len(ids) if ids else 0.0)
    return out


class PhaseClock:
    """Seconds of the probe's phases, per probe step: wraps the named methods of Probe and EntropyProbeCallback
    (class attributes, restored on exit) and reads compute_delta_h1's own phase timings from its log line."""

    WRAPPED = {
        "sample_e": ("probe", "sample_e"),
        "sample_u": ("probe", "sample_u"),
        "delta_h1_with_second_order": ("probe", "delta_h1"),
        "second_order": ("probe", "second_order"),
        "forecast": ("probe", "forecast"),
        "observed_change": ("callback", "observed_change"),
    }

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.current: dict[str, float] = {}

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = {}

    @contextlib.contextmanager
    def installed(self):
        from entropy_probe.probe import Probe

        owners = {"probe": Probe, "callback": EntropyProbeCallback}
        saved = []
        clock = self

        def wrap(key, fn):
            def timed(*a, **k):
                start = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    clock.current[key] = clock.current.get(key, 0.0) + time.perf_counter() - start

            return timed

        class Phases(logging.Handler):
            def emit(self, record):
                if record.msg == "delta-h1: phase seconds %s":
                    timings = record.args if isinstance(record.args, dict) else record.args[0]
                    for name, s in timings.items():
                        key = f"compute_delta_h1.{name}"
                        clock.current[key] = clock.current.get(key, 0.0) + s

        probe_log = logging.getLogger("entropy_probe.probe")
        handler, level = Phases(level=logging.INFO), probe_log.level
        probe_log.addHandler(handler)
        probe_log.setLevel(logging.INFO)
        for key, (owner, name) in self.WRAPPED.items():
            cls = owners[owner]
            saved.append((cls, name, cls.__dict__[name]))
            setattr(cls, name, wrap(key, cls.__dict__[name]))
        try:
            yield self
        finally:
            for cls, name, fn in saved:
                setattr(cls, name, fn)
            probe_log.removeHandler(handler)
            probe_log.setLevel(level)


def step_timer():
    """A Trainer callback: each step's wall time since the previous step's end (from on_train_begin for the
    first) and since its own on_step_begin. Added before the probe's callback: neither includes a probe step
    that ran at this step's end (the interval of the step after it does)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.intervals, self.bodies, self.last, self.begin = [], [], None, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.intervals.append(now - self.last)
            self.bodies.append(now - self.begin)
            self.last = now

    return StepTimer()


def after_probe(clock: PhaseClock, callback: EntropyProbeCallback):
    """A Trainer callback added after `callback`: closes the clock's probe step once the probe has run."""
    from transformers import TrainerCallback

    class Close(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if len(callback.history) > len(clock.steps):
                clock.end_step()

    return Close()


def shape_params(args, dataset: Path):
    params = load_params(ROOT / "params.yaml")
    params.batch_config.dataset_name = str(dataset)
    params.batch_config.B_E = args.B_E
    params.batch_config.B_U = args.prompts_per_step
    params.batch_config.G = args.num_generations
    params.generation.max_new_tokens = args.completion_length
    return params


def train_shape(args, cfg: dict, tokenizer, records: list[dict], run_dir: Path, params=None, clock=None) -> dict:
    """One GRPO run at `cfg`'s shape (with the callback when `params` is given); its step times, the callback's
    history and the final trainable weights."""
    import datasets
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from entropy_probe.demo import _offline_and_quiet, grpo_config
    from entropy_probe.params import DemoParams

    model = bench.build_model(dict(cfg, full=True), "cpu", torch.float32, False, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(args.head_scale / 8.0)  # bench.build_model scaled it ×8 (tied: the embedding too)
    demo = DemoParams(
        seed=0,
        rl_steps=args.steps,
        save_steps=args.steps,
        rl_lr=args.lr,
        lora_rank=cfg["lora_rank"],
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
    )
    config = grpo_config(demo, run_dir)
    config.max_completion_length = args.completion_length
    config.save_strategy = "no"  # the final weights are compared in memory
    lora = LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=2 * cfg["lora_rank"],
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    timer = step_timer()
    load_before = os.getloadavg()
    with _offline_and_quiet():
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=even_words,
            args=config,
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        callback = None
        if params is not None:
            callback = EntropyProbeCallback(trainer, args.every, params, forecast_draws=args.forecast_draws)
            trainer.add_callback(callback)
            trainer.add_callback(after_probe(clock, callback))
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    out = {
        "intervals": timer.intervals,
        "bodies": timer.bodies,
        "wall": wall,
        "history": [] if callback is None else callback.history,
        "weights": weights,
        "n_params": sum(p.numel() for p in trainer.model.parameters()),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    del trainer, model, callback
    gc.collect()
    return out


def run_shape(args) -> dict:
    from entropy_probe.demo import _quiet_libraries

    _quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = dict(bench.SHAPES[args.shape])
    cfg["layers"] = args.layers or cfg["layers"]
    tokenizer = bench.build_tokenizer(cfg["vocab"])
    prompts = bench.random_prompts(cfg, 4 * max(args.B_E, 4 * args.prompts_per_step), seed=3)
    records = [{"prompt": p, "answer": "even"} for p in prompts]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "prompts.jsonl"
        dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
        params = shape_params(args, dataset)
        plain = train_shape(args, cfg, tokenizer, records, Path(tmp) / "plain")
        clock = PhaseClock()
        with clock.installed():
            probed = train_shape(args, cfg, tokenizer, records, Path(tmp) / "probed", params, clock)
    a, b = plain.pop("weights"), probed.pop("weights")
    identical = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    history = probed["history"]
    probe_seconds = [r["entropy_probe/seconds"] for r in history]
    train_step = sum(plain["intervals"]) / len(plain["intervals"])
    later = [r["entropy_probe/seconds"] for r in history if "entropy_probe/observed_delta_h" in r]  # + observed ΔH
    trainable = sum(t.numel() for t in a.values())
    return {
        "shape": args.shape,
        "layers": cfg["layers"],
        "model": {
            "parameters": plain["n_params"],
            "trainable": trainable,
            "vocab": cfg["vocab"],
            "hidden": cfg["hidden"],
        },
        "env": bench.environment("cpu"),
        "trainer": {
            "steps": args.steps,
            "prompts_per_step": args.prompts_per_step,
            "num_generations": args.num_generations,
            "completion_length": args.completion_length,
            "lr": args.lr,
            "lora_rank": cfg["lora_rank"],
            "head_scale": args.head_scale,
            "reward": "even_words",
        },
        "every": args.every,
        "forecast_draws": args.forecast_draws,
        "B_E": args.B_E,
        "B_U": args.prompts_per_step,
        "G": args.num_generations,
        "second_order": params.second_order.enabled,
        "train_step_seconds": train_step,
        "train_step_intervals_s": plain["intervals"],
        "train_step_bodies_s": plain["bodies"],
        "probed_run_train_step_bodies_s": probed["bodies"],
        "probe_step_seconds": probe_seconds,
        "probe_steps": [r["step"] for r in history],
        **summary(probe_seconds, train_step),
        "probe_per_train_step_with_observed": (sum(later) / len(later) / train_step if later else None),
        "probe_phases_s": clock.steps,
        "probe_metrics": [{k: v for k, v in r.items() if k != "entropy_probe/seconds"} for r in history],
        "wall_plain_run_seconds": plain["wall"],
        "wall_probed_run_seconds": probed["wall"],
        "wall_seconds": time.perf_counter() - start,
        "load_average": {
            "plain_before": plain["load_average_before"],
            "plain_after": plain["load_average_after"],
            "probed_before": probed["load_average_before"],
            "probed_after": probed["load_average_after"],
        },
        "identical_final_weights": identical,
    }


if __name__ == "__main__":
    main()
