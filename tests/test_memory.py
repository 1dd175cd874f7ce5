"""Peak memory of delta-h1 is flat in B_E: token-budget microbatches, nothing [N, R, V]- or graph-sized kept per row.

Each configuration runs in a fresh interpreter (`sys.executable -c`) on the demo-size model (tiny Qwen2,
hidden 64, 2 layers, LoRA on q/k/v/o) and reports its peak resident memory above the baseline taken
after everything is loaded and one tiny warm-up call has initialised the libraries.

How the peak is measured: VmHWM from /proc/self/status after resetting it with /proc/self/clear_refs
("5", Linux ≥ 4.0) at the baseline, with freed heap returned to the OS first (malloc_trim).
`ru_maxrss` cannot be used in a child: it starts at the *parent's* peak (fork copies the page counters
and exec keeps them in signal->maxrss), so a pytest parent larger than the child hides the child's peak.
The child runs with MALLOC_MMAP_THRESHOLD_=65536: every block ≥ 64 KiB (all tensors that matter) is
mmapped and returned to the OS when freed, so RSS follows live memory. With glibc's default dynamic
threshold, freed tensors stay in the heap and the peak doubles and wobbles by ~5% between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import ctypes, gc, json, sys
import torch
torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model
from entropy_probe.probe import UpdateSpec, compute_delta_h1
from entropy_probe.scoring import Batch
from entropy_probe.params import EstimatorParams
from entropy_probe.policy import teacher_force
from entropy_probe.tiny import build_model
from entropy_probe.update import AdamState, FlatLayout, group_advantages

B_E, max_tokens = int(sys.argv[1]), int(sys.argv[2])
P, R, V = 8, 56, 14          # 64 columns = the tiny model's max_position_embeddings
B_U, G = 16, 4               # the same U batch in every configuration

base = build_model(hidden_size=64, num_layers=2, num_heads=4, seed=0)
torch.manual_seed(1)
lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  init_lora_weights=False)
model = get_peft_model(base, lora).eval()

def artifact(n, seed):
    # a sample artifact: left-padded prompts, right-padded responses of random length, stats by teacher forcing
    gen = torch.Generator().manual_seed(seed)
    plens = torch.randint(3, P + 1, (n,), generator=gen)
    rlens = torch.randint(1, R + 1, (n,), generator=gen)
    cols = torch.arange(P + R)[None, :]
    attn = (((cols >= P - plens[:, None]) & (cols < P)) | ((cols >= P) & (cols < P + rlens[:, None]))).long()
    ids = torch.randint(0, V, (n, P + R), generator=gen) * attn + 15 * (1 - attn)
    mask = torch.arange(R)[None, :] < rlens[:, None]
    stats = teacher_force(model, ids, attn, P, mask, 1.0, 1.0)
    return {"input_ids": ids, "attention_mask": attn, "prompt_lens": plens, "response_lens": rlens,
            "truncated": rlens == R, "prompt_index": torch.arange(n), "logprobs": stats.logprobs,
            "entropies": stats.entropies, "top1_prob": stats.top1_prob, "margin": stats.margin}

def u_artifact(n_groups, seed):
    t = artifact(n_groups * G, seed)
    rewards = (torch.arange(n_groups * G) % 3 == 0).float()
    t.update(rewards=rewards, advantages=group_advantages(rewards.view(n_groups, G), True, 1e-4).view(-1),
             group_index=torch.arange(n_groups).repeat_interleave(G))
    return t

cpu = torch.device("cpu")
E = Batch.from_tensors(artifact(B_E, 1), 1.0, 1.0, cpu)
U = Batch.from_tensors(u_artifact(B_U, 2), 1.0, 1.0, cpu)
named = {n: p for n, p in model.named_parameters() if p.requires_grad}
layout = FlatLayout.from_named(named)
m = {n: 1e-3 * torch.randn(p.shape) for n, p in named.items()}
v = {n: 1e-5 * torch.rand(p.shape) for n, p in named.items()}
groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "names": list(named)}]
state = AdamState.from_groups(layout, {n: p.detach() for n, p in named.items()}, m, v, {n: 3.0 for n in named}, groups)
spec = UpdateSpec("adam_step", state, 1.0, "token-mean", None)
est = EstimatorParams(baseline="regression")  # the baseline with the most per-row work

# warm-up on a few rows (thread pools, kernel caches), then the baseline
compute_delta_h1(model, Batch.from_tensors(artifact(4, 3), 1.0, 1.0, cpu), Batch.from_tensors(u_artifact(1, 4), 1.0, 1.0, cpu),
                 layout, spec, est, max_tokens)

def status_kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status_kb("VmRSS")
result = compute_delta_h1(model, E, U, layout, spec, est, max_tokens)
peak = status_kb("VmHWM") - baseline
print(json.dumps({"peak_kb": peak, "baseline_kb": baseline, "n_microbatches": len(E.slices(max_tokens)),
                  "delta_h1": result["delta_h1"]}))
"""


def _peak(B_E: int, max_tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(B_E), str(max_tokens)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _clear_refs_works(), reason="needs Linux /proc/self/clear_refs"
)
def test_peak_memory_of_delta_h1_is_flat_in_B_E():
    from entropy_probe.params import ComputeParams

    budget = ComputeParams().max_tokens_per_microbatch  # the default token budget (64 rows × 64 columns here)
    small, large = _peak(64, budget), _peak(512, budget)
    assert small["n_microbatches"] == 1 and large["n_microbatches"] == 8
    assert small["peak_kb"] > 10_000, small  # the work itself is visible above the baseline
    assert abs(large["peak_kb"] - small["peak_kb"]) <= 0.10 * small["peak_kb"], (small, large)
    # the measurement does see growth: the same 512 rows in ONE microbatch need several times more memory
    whole = _peak(512, 512 * 64)
    assert whole["n_microbatches"] == 1
    assert whole["peak_kb"] > 3 * small["peak_kb"], (small, whole)
