"""Shared fixtures: tiny offline models and tokenizers (never downloaded)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

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
