"""Where a full-parameter δH₁ holds its memory: bytes per trainable parameter, per phase of `compute_delta_h1`.

    python bench/memory_phases.py [--hidden 512 --layers 4 --vocab 32000] [--out bench/results/memory_phases.json]

One process, one thread. A random full-parameter Qwen2 (`bench.build_model`, every tensor trainable), random-token
E and U batches scored by the model (`bench.random_token_tensors`), and a synthetic AdamW state in the Trainer's
two param groups (2-D weights with decay, biases and norms without) built as `OptimizerState` and turned into the
update state by the library's own `update_rule.flat_state`, as delta-h1 does. A thread samples VmRSS every 5 ms;
each sample is charged to the phase `compute_delta_h1` is in (its `Clock` phases; "between" is the work outside
them: directions, dot products, the momentum part). Reported, per parameter:
  - model: the fp32 policy's own parameters (4 bytes);
  - moments: the AdamW moments (named, one buffer each: `OptimizerState`);
  - update_state: what building the update state adds (θ flat, the per-element weight decay of two groups);
  - per phase: the peak above the memory before `compute_delta_h1` (delta method for SE_U: no group gradients);
  - beside them, the same for a trainer's forward + backward into .grad on the U tokens and on the E tokens
    (`bench.plain_forward_backward`): the gradient and the activations a training step holds on top of θ and the
    moments (its optimizer step adds AdamW's temporaries).
Each phase starts from memory returned to the system (gc, malloc_trim), so its peak is what it holds live.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
from entropy_probe import delta_h1  # noqa: E402
from entropy_probe.optimizer_state import OptimizerState  # noqa: E402
from entropy_probe.params import EstimatorParams  # noqa: E402
from entropy_probe.specs import ComputeBudget  # noqa: E402
from entropy_probe.update import FlatLayout  # noqa: E402
from entropy_probe.update_rule import UpdateRule, flat_state  # noqa: E402


def rss() -> int:
    """This process's resident memory in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled() -> int:
    """VmRSS after freeing what can be freed (gc, and glibc's free lists returned to the system)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss()


def trainer_state(model) -> tuple[FlatLayout, OptimizerState]:
    """A synthetic AdamW state after 10 steps in the Trainer's decay / no-decay groups, in optimizer order."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [n for n, p in named.items() if p.dim() >= 2]
    rest = [n for n in named if n not in decay]
    groups = [
        {"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": wd, "names": names}
        for wd, names in ((0.01, decay), (0.0, rest))
    ]
    order = decay + rest
    gen = torch.Generator().manual_seed(0)
    m = {n: 1e-3 * torch.randn(named[n].shape, generator=gen) for n in order}
    v = {n: 1e-6 * torch.rand(named[n].shape, generator=gen) for n in order}
    return FlatLayout.from_named(named, order), OptimizerState(order, m, v, {n: 10.0 for n in order}, groups, "bench")


class PhasePeaks:
    """Samples VmRSS in a thread and keeps the largest sample per phase label."""

    def __init__(self) -> None:
        self.phase, self.peaks, self._stop = "between", {}, False
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop:
            now = rss()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), now)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default="bench/results/memory_phases.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(vocab=args.vocab, hidden=args.hidden, intermediate=3 * args.hidden, layers=args.layers, heads=8,
               kv_heads=8, prompt_len=16, new_tokens=32, B_E=16, B_U=4, G=4, max_tokens=2048, temperature=1.0,
               top_p=1.0, full=True, random_tokens=True)  # fmt: skip
    start = settled()
    model = bench.build_model(cfg, "cpu", torch.float32, False)
    E_t = bench.score_token_stats(model, bench.random_token_tensors(cfg, cfg["B_E"], 1, seed=1), cfg, "cpu")
    U_t = bench.score_token_stats(model, bench.random_token_tensors(cfg, cfg["B_U"], cfg["G"], seed=2), cfg, "cpu")
    E, U = bench.to_batches(E_t, U_t, cfg, "cpu")
    with_model = settled()
    layout, optimizer = trainer_state(model)
    with_moments = settled()
    rule = UpdateRule("adam_step", flat_state(optimizer, model, layout, None), "token-mean", max_grad_norm=1.0)
    base = settled()
    peaks = PhasePeaks()
    clock_call = delta_h1.Clock.__call__

    def charged(clock, phase, fn, *a, **k):
        settled()  # what earlier phases freed returned to the system, so RSS measures what is live
        peaks.phase = phase
        try:
            return clock_call(clock, phase, fn, *a, **k)
        finally:
            peaks.phase = "between"

    delta_h1.Clock.__call__ = charged
    budget = ComputeBudget(max_tokens=cfg["max_tokens"], u_cache_mb=0)
    with peaks:
        for name, batch in (("training_step_on_U", U), ("training_step_on_E", E)):  # the trainer's backward
            charged(delta_h1.Clock(), name, bench.plain_forward_backward, model, [batch], cfg["max_tokens"])
        estimate = delta_h1.compute_delta_h1(model, E, U, layout, rule, EstimatorParams(), budget)
    delta_h1.Clock.__call__ = clock_call
    n = layout.numel
    result = {
        "parameters": n,
        "shape": {k: cfg[k] for k in ("hidden", "layers", "vocab")},
        "bytes_per_parameter": {
            "model_and_batches": round((with_model - start) / n, 2),
            "moments": round((with_moments - with_model) / n, 2),
            "update_state": round((base - with_moments) / n, 2),
            "peak_above_start_of_delta_h1": {k: round((v - base) / n, 2) for k, v in peaks.peaks.items()},
        },
        "delta_h1": estimate.delta_h1,
        "phase_seconds": estimate.timings,
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["bytes_per_parameter"], indent=2))
    return result


if __name__ == "__main__":
    main()
