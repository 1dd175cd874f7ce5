"""Benchmark of the probe's cost as ratios to the passes it cannot avoid (results: bench/README.md).

    python bench/bench.py [--quick] [--out bench/results/bench.json] [--device cuda --dtype bf16 [--qlora]]
    python bench/bench.py --shape qwen2.5-0.5b [--layers N] --out bench/results/bench_cpu_qwen05b.json
    python bench/bench.py --shape qwen2.5-0.5b --layers 1 --full ...     (a full-parameter policy, no LoRA)

A random Qwen2 larger than the demo + LoRA; E and U sampled by the product's `generate_responses`; the
product's own passes timed on them (one warm-up, then the median of `repeats` interleaved rounds):

    delta_h1 = t(compute_delta_h1 on E, U)                                    / t(plain fwd+bwd)   ≤ 1.2
    se_extra = [t(group_gradients) − t(policy_gradient) + t(entropy_rows) − t(E pass without tangents)]
                                                                              / t(plain fwd+bwd)   ≤ 0.2
    delta_h1_without_se = [t(policy_gradient) + t(E pass without tangents)]   / t(plain fwd+bwd)   ≤ 1.05
    all_targets_e_pass_extra = [t(entropy_pass, double backward) − t(entropy_rows)] / t(plain)    (opt-in)
    second_order = t(second_order: δH₂ ± SE, two E passes + re-scoring)          / t(plain fwd+bwd)   (opt-out)
    sample   = t(generate_responses)                                          / t(plain generate)  ≤ 1.05
    memory   = peak(compute_delta_h1) / peak(plain fwd+bwd), above the post-load baseline, each in a
               fresh process (CPU: VmHWM after clear_refs; CUDA: max_memory_allocated)
    memory_vs_train_step = peak(compute_delta_h1) / peak(train step: fwd+bwd of the PG loss on U alone)

"plain fwd+bwd" is a trainer's step on the same E and U tokens: forward on the same padded input_ids
(logits for the response columns only), log_softmax(logits / T), gather, masked sum, `.backward()`
into `.grad`, in the same token-budget microbatches. "E pass without tangents" is `entropy_pass` with
no direction (X̄ alone, what δH₁ needs without SE_E).

`--shape qwen2.5-0.5b` (or `qwen2.5-1.5b`) builds those shapes from a config with random weights (no download) and
random token ids instead of sampled responses (this keeps a CPU run within minutes; that shape has no
`sample` ratio); `--layers` keeps fewer decoder layers, same hidden size and vocabulary.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_probe.delta_h1 import compute_delta_h1  # noqa: E402
from entropy_probe.estimators import TARGETS as ESTIMATOR_TARGETS  # noqa: E402
from entropy_probe.estimators import entropy_coefficients  # noqa: E402
from entropy_probe.generation import GenerationSpec, generate_responses, neutral_generation_config  # noqa: E402
from entropy_probe.params import EstimatorParams, SecondOrderParams  # noqa: E402
from entropy_probe.passes import entropy_pass, entropy_rows, group_gradients, policy_gradient  # noqa: E402
from entropy_probe.scoring import Batch  # noqa: E402
from entropy_probe.second_order import second_order  # noqa: E402
from entropy_probe.specs import ComputeBudget, SecondOrderSpec  # noqa: E402
from entropy_probe.update import AdamState, FlatLayout, group_advantages, pg_coefficients, update_direction  # noqa: E402
from entropy_probe.update_rule import UpdateRule  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOS, PAD = "<eos>", "<pad>"
FULL = dict(
    hidden=256,
    layers=4,
    heads=4,
    kv_heads=2,
    vocab=2048,
    lora_rank=16,
    prompt_len=24,
    new_tokens=64,
    B_E=32,
    B_U=8,
    G=4,
    max_tokens=4096,
    repeats=5,
)
QUICK = dict(FULL, B_E=16, B_U=4, repeats=2)
# real model shapes with random weights; "random_tokens": E and U are random ids (all responses full
# length new_tokens, no eos), not sampled, and their per-token statistics come from one scoring pass
SHAPES = {
    "qwen2.5-0.5b": dict(
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        vocab=151936,
        tie_word_embeddings=True,
        lora_rank=16,
        prompt_len=16,
        new_tokens=256,
        B_E=4,
        B_U=2,
        G=2,
        max_tokens=4096,
        repeats=2,
        random_tokens=True,
    ),
}
# Qwen2.5-1.5B: wider and 28 layers, tied embeddings as well; the same batches and LoRA
SHAPES["qwen2.5-1.5b"] = dict(SHAPES["qwen2.5-0.5b"], hidden=1536, layers=28, heads=12, intermediate=8960)
OPTIONAL = ("e_pass_all_targets", "second_order")  # timed passes --skip may leave out
TARGETS = {
    "delta_h1": 1.2,
    "se_extra": 0.2,
    "delta_h1_without_se": 1.05,
    "sample": 1.05,
    "memory_vs_train_step": 1.3,
}


# ----------------------------------------------------------------------------- model, tokenizer, batches


def build_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` tokens: w0 … w{vocab−3}, eos, pad (whitespace-separated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 2)] + [EOS, PAD]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, padding_side="left")


def build_model(cfg: dict, device: str, dtype: torch.dtype, qlora: bool, seed: int = 0):
    """Random Qwen2 (eager attention) + LoRA on every linear layer with non-zero B, eval mode.

    The LM head is scaled up so the policy is peaked like a trained model's (entropy of a few nats
    rather than log V), which keeps the sampled lengths and the top-p nucleus realistic.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg.get("intermediate", 3 * cfg["hidden"]),
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["prompt_len"] + cfg["new_tokens"] + 8,
        eos_token_id=cfg["vocab"] - 2,
        pad_token_id=cfg["vocab"] - 1,
        bos_token_id=None,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = Qwen2ForCausalLM(config)
        with torch.no_grad():
            base.lm_head.weight.mul_(8.0)
    if qlora:  # through a saved copy: bitsandbytes quantises at load time
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=dtype, device_map={"": device}, attn_implementation="eager", quantization_config=quant
            )
        if device == "cpu":
            from entropy_probe.checkpoint import _disable_bnb_cpu_packing

            _disable_bnb_cpu_packing(base)
    else:
        base = base.to(device=device, dtype=dtype)
    if cfg.get("full"):  # full-parameter training: every tensor trainable, no adapter
        return base.requires_grad_(True).eval()
    lora = LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=2 * cfg["lora_rank"],
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, lora)
        with torch.no_grad():  # init_lora_weights=False draws B like A; keep the adapter a perturbation
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
    return model.eval()


def random_prompts(cfg: dict, n: int, seed: int) -> list[str]:
    """n prompts of random words, lengths between prompt_len/2 and prompt_len (so left padding occurs)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(cfg["prompt_len"] // 2, cfg["prompt_len"] + 1, (n,), generator=gen)
    return [" ".join(f"w{int(t)}" for t in torch.randint(0, cfg["vocab"] - 2, (int(k),), generator=gen)) for k in lens]


def random_token_tensors(cfg: dict, n_prompts: int, rows_per_prompt: int, seed: int) -> dict:
    """Sample tensors in the artifact layout from random ids: prompts of prompt_len/2 … prompt_len tokens
    (left-padded), each repeated rows_per_prompt times, every response new_tokens long (truncated, no eos).

    The per-token statistics are zero here; `score_token_stats` fills them under the model.
    """
    gen = torch.Generator().manual_seed(seed)
    P, R, n = cfg["prompt_len"], cfg["new_tokens"], n_prompts * rows_per_prompt
    lens = torch.randint(P // 2, P + 1, (n_prompts,), generator=gen).repeat_interleave(rows_per_prompt)
    prompt = torch.randint(0, cfg["vocab"] - 2, (n_prompts, P), generator=gen).repeat_interleave(rows_per_prompt, 0)
    prompt_mask = (torch.arange(P)[None, :] >= P - lens[:, None]).long()
    input_ids = torch.cat([torch.where(prompt_mask.bool(), prompt, cfg["vocab"] - 1), torch.zeros(n, R).long()], 1)
    input_ids[:, P:] = torch.randint(0, cfg["vocab"] - 2, (n, R), generator=gen)
    stats = {k: torch.zeros(n, R) for k in ("logprobs", "entropies", "top1_prob", "margin")}
    return {
        "input_ids": input_ids,
        "attention_mask": torch.cat([prompt_mask, torch.ones(n, R).long()], 1),
        **stats,
        "prompt_lens": lens,
        "response_lens": torch.full((n,), R),
        "truncated": torch.ones(n, dtype=torch.bool),
    }


def score_token_stats(model, tensors: dict, cfg: dict, device: str) -> dict:
    """The tensors with their per-token statistics (ℓ, H, top1, margin) from one scoring pass under `model`."""
    B = Batch.from_tensors(tensors, cfg["temperature"], cfg["top_p"], device)
    stats = B.token_stats(model, cfg["max_tokens"])
    return dict(tensors, **{k: v.float().cpu() for k, v in stats.items()})


def sample(model, tok, prompts: list[str], cfg: dict, seed: int) -> dict:
    spec = GenerationSpec(cfg["temperature"], cfg["top_p"], cfg["new_tokens"], batch_size=len(prompts), seed=seed)
    return generate_responses(model, tok, prompts, spec, progress=False)


def to_batches(E_t: dict, U_t: dict, cfg: dict, device: str) -> tuple[Batch, Batch]:
    """E and U Batches; U gets verifiable 0/1 rewards and group-normalised advantages (G rows per prompt)."""
    n_groups, G = cfg["B_U"], cfg["G"]
    rewards = torch.randint(0, 2, (n_groups * G,), generator=torch.Generator().manual_seed(7)).float()
    group = torch.arange(n_groups).repeat_interleave(G)
    U_t = dict(
        U_t,
        prompt_index=group,
        group_index=group,
        rewards=rewards,
        advantages=group_advantages(rewards.view(n_groups, G), True, 1e-4).view(-1),
    )
    E_t = dict(E_t, prompt_index=torch.arange(len(E_t["input_ids"])))
    T, top_p, device = cfg["temperature"], cfg["top_p"], torch.device(device)
    return Batch.from_tensors(E_t, T, top_p, device), Batch.from_tensors(U_t, T, top_p, device)


def adam_spec(model, seed: int = 0) -> tuple[FlatLayout, UpdateRule]:
    """A synthetic AdamW state after 10 steps (momentum and second moment of plausible size)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = FlatLayout.from_named(named)
    gen = torch.Generator().manual_seed(seed)
    m = {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in named.items()}
    v = {n: 1e-6 * torch.rand(p.shape, generator=gen) for n, p in named.items()}
    groups = [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "names": list(named)}]
    theta = {n: p.detach().float() for n, p in named.items()}
    state = AdamState.from_groups(layout, theta, m, v, {n: 10.0 for n in named}, groups, dtype=None)  # as the probe
    return layout, UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0)


# ----------------------------------------------------------------------------- the work that is timed


def plain_forward_backward(model, batches: list[Batch], max_tokens: int) -> None:
    """A trainer's step on the same tokens: Σ_ij A_i·log π(y_ij) over the response, backward into .grad."""
    for B in batches:
        adv = B.tensors.get("advantages", torch.ones(len(B), device=B.mask.device))
        for rows in B.slices(max_tokens):
            ids, am = B.input_ids[rows], B.attention_mask[rows]
            keep = torch.arange(B.n_prompt_cols - 1, ids.shape[1] - 1, device=ids.device)
            logits = model(
                input_ids=ids,
                attention_mask=am,
                position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                logits_to_keep=keep,
                use_cache=False,
            ).logits
            logp = torch.log_softmax(logits.float() / B.temperature, dim=-1)
            token_logp = logp.gather(-1, ids[:, B.n_prompt_cols :].unsqueeze(-1)).squeeze(-1)
            (-(token_logp * B.mask[rows] * adv[rows].unsqueeze(1)).sum() / B.mask.sum()).backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def plain_generate(model, tok, prompts: list[str], cfg: dict, seed: int) -> int:
    """transformers' own sampling (same T, top-p, no top-k, KV cache) on the same prompts; returns steps."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    device = model.get_input_embeddings().weight.device
    config = neutral_generation_config(cfg["new_tokens"], tok.eos_token_id, tok.pad_token_id)
    config.temperature, config.top_p = cfg["temperature"], cfg["top_p"]
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device), generation_config=config
    )
    return out.shape[1] - enc["input_ids"].shape[1]


def work(
    model, E: Batch, U: Batch, layout: FlatLayout, spec: UpdateRule, max_tokens: int, target: str, u_cache_mb: float
) -> dict:
    """The timed callables, all on the same E and U (the direction is Δθ of the U gradient; `u_cache_mb`: delta-h1's
    compute.u_gradient_cache_mb, 0 for SE_U by the delta method)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    est = EstimatorParams(entropy=target)
    coef = pg_coefficients(U.tensors["advantages"].float(), U.mask, spec.loss_agg_mode, spec.max_len).float()
    groups = torch.unique(U.tensors["group_index"], return_inverse=True)[1]
    g = policy_gradient(model, params, layout, U, coef, max_tokens)
    delta = update_direction(spec.rule, g, spec.state, spec.max_grad_norm)  # as delta-h1 forms it
    direction = [d.to(p.dtype) for d, p in zip(layout.unflatten(delta.float()).values(), params)]
    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], -1).float()
    coefs = entropy_coefficients(
        E.tensors["entropies"].float(), E.mask, target=est.entropy, baseline=est.baseline, features=features
    )
    second = SecondOrderParams()

    def delta_h2():
        return second_order(
            model,
            E,
            layout,
            delta,
            est,
            SecondOrderSpec.of(second),
            lr=float(spec.state.lr.mean()),
            max_tokens=max_tokens,
        )

    return {
        "plain_fwd_bwd": lambda: plain_forward_backward(model, [E, U], max_tokens),
        "delta_h1": lambda: compute_delta_h1(
            model, E, U, layout, spec, est, ComputeBudget(max_tokens, u_cache_mb=u_cache_mb)
        ),
        "u_gradient": lambda: policy_gradient(model, params, layout, U, coef, max_tokens),
        # the same backward keeping per-group gradients (the jackknife's input)
        "u_group_gradients": lambda: group_gradients(model, params, layout.names, U, coef, groups, max_tokens),
        # one backward with row hooks: X̄ and every row's X_i·Δθ (SE_E, E attributions)
        "e_rows": lambda: entropy_rows(model, params, layout.names, E, coefs, direction, max_tokens),
        # X̄ alone: what δH₁ needs without SE_E
        "e_pass_gradient_only": lambda: entropy_pass(model, params, layout, E, coefs, None, max_tokens),
        # compute.all_targets: per-token tangents by double backward
        "e_pass_all_targets": lambda: entropy_pass(model, params, layout, E, coefs, direction, max_tokens),
        "second_order": delta_h2,
    }


def memory_kinds(model, E: Batch, U: Batch, layout: FlatLayout, spec: UpdateRule, cfg: dict) -> dict:
    """The timed callables plus `train_step`: a trainer's step on U alone (fwd+bwd of the PG loss)."""
    max_tokens = cfg["max_tokens"]
    fns = work(model, E, U, layout, spec, max_tokens, cfg["target"], cfg["u_cache_mb"])
    fns["train_step"] = lambda: plain_forward_backward(model, [U], max_tokens)
    return fns


# ----------------------------------------------------------------------------- timing and memory


def time_rounds(fns: dict, repeats: int, device: str, keep=None) -> tuple[dict, dict]:
    """One warm-up call each, then `repeats` interleaved rounds; (times [s] per name, last output of the names in
    `keep`, all when None: the others are dropped at once, which matters when θ has hundreds of millions of
    elements)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    outs = {}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for round_ in range(repeats + 1):
        for k, fn in fns.items():
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            if round_:  # round 0 is the warm-up
                times[k].append(time.perf_counter() - start)
            if keep is None or k in keep:
                outs[k] = out
            del out
    return times, outs


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def measure_memory_child(args) -> None:
    """Subprocess entry (--measure-memory KIND): peak memory of one call above the post-load baseline.

    A one-row forward+backward first initialises the libraries (thread pools, kernel caches). On CPU
    the peak is VmHWM after resetting it through /proc/self/clear_refs: a child's ru_maxrss starts at
    its parent's peak. The parent sets MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave RSS.
    """
    cfg = json.loads(args.cfg_json)
    torch.set_num_threads(args.threads)
    model = build_model(cfg, args.device, DTYPES[args.dtype], args.qlora)
    E, U = to_batches(*torch.load(args.batches, weights_only=True), cfg, args.device)
    layout, spec = adam_spec(model)
    one = Batch(E.input_ids[:1], E.attention_mask[:1], E.mask[:1], E.n_prompt_cols, E.temperature, E.top_p, {})
    plain_forward_backward(model, [one], cfg["max_tokens"])
    fn = memory_kinds(model, E, U, layout, spec, cfg)[args.measure_memory]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        base = _status_bytes("VmRSS")
        fn()
        peak, how = _status_bytes("VmHWM") - base, "VmHWM after clear_refs"
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": base, "method": how}))


def peak_memory(kind: str, cfg: dict, args, batches_file: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure-memory",
        kind,
        "--cfg-json",
        json.dumps(cfg),
        "--batches",
        batches_file,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ] + ["--qlora"] * args.qlora
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # every block ≥ 64 KiB returns to the OS when freed
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(fn, device: str, path: Path) -> None:
    """torch.profiler table of one call (ops by self time, then by input shape)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        fn()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=30)
    text += "\n" + prof.key_averages(group_by_input_shape=True).table(
        sort_by=key, row_limit=40, max_shapes_column_width=80
    )
    path.write_text(text)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main


def ratios(t: dict) -> dict:
    plain = t["plain_fwd_bwd"]
    out = {
        "delta_h1": t["delta_h1"] / plain,
        "se_extra": (t["u_group_gradients"] - t["u_gradient"] + t["e_rows"] - t["e_pass_gradient_only"]) / plain,
        "delta_h1_without_se": (t["u_gradient"] + t["e_pass_gradient_only"]) / plain,
    }
    if "e_pass_all_targets" in t:  # (optional passes: --skip)
        out["all_targets_e_pass_extra"] = (t["e_pass_all_targets"] - t["e_rows"]) / plain
    if "second_order" in t:
        out["second_order"] = t["second_order"] / plain
    if "generate_responses" in t:  # not timed for shapes with random tokens
        out["sample"] = t["generate_responses"] / t["plain_generate"]
    return out


def add_common_arguments(ap: argparse.ArgumentParser, out: str, quick_help: str) -> None:
    """The arguments `run_config`, `build_model` and the timing read (shared with the other benchmarks)."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--shape", choices=["default", *SHAPES], default="default", help="model shape and batches")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--out", default=out)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    ap.add_argument("--full", action="store_true", help="full-parameter policy: every tensor trainable, no LoRA")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other load)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (median)")
    ap.add_argument("--target", choices=ESTIMATOR_TARGETS, default=EstimatorParams().entropy, help="estimator.entropy")
    ap.add_argument(
        "--u-cache-mb",
        type=float,
        default=ComputeBudget().u_cache_mb,
        help="compute.u_gradient_cache_mb (0: SE_U by the delta method, as at real size)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(
        ap, str(ROOT / "bench/results/bench.json"), "smaller batches, 2 rounds (≲ 1 min on 2 CPU cores)"
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=OPTIONAL, help="leave out optional passes (deep shapes on CPU)"
    )
    ap.add_argument("--memory-passes", action="store_true", help="also the peak memory of each pass")
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler table of one compute_delta_h1")
    for internal in ("--measure-memory", "--cfg-json", "--batches"):  # one memory measurement in a fresh process
        ap.add_argument(internal, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def run_config(args) -> dict:
    """The shape, batches and settings of a run (`args`: the arguments of `add_common_arguments`)."""
    base_cfg = SHAPES[args.shape] if args.shape != "default" else (QUICK if args.quick else FULL)
    cfg = dict(base_cfg, temperature=args.temperature, top_p=args.top_p, target=args.target)
    cfg["repeats"] = args.repeats or cfg["repeats"]
    cfg["layers"] = args.layers or cfg["layers"]
    cfg["full"] = args.full
    cfg["u_cache_mb"] = args.u_cache_mb
    return cfg


def sample_tensors(model, cfg: dict, device: str, time_sampling: bool = True) -> tuple[dict, dict, dict, dict | None]:
    """(E tensors, U tensors, sampling times, generated steps): random ids scored under `model` for the shapes with
    random tokens, else drawn by the product's generate_responses — with `time_sampling`, E's draw timed against
    plain generate (same prompts and settings) in `repeats` interleaved rounds, and its last draw kept."""
    if cfg.get("random_tokens"):
        E_t = score_token_stats(model, random_token_tensors(cfg, cfg["B_E"], 1, seed=1), cfg, device)
        U_t = score_token_stats(model, random_token_tensors(cfg, cfg["B_U"], cfg["G"], seed=2), cfg, device)
        return E_t, U_t, {}, None
    tok = build_tokenizer(cfg["vocab"])
    E_prompts = random_prompts(cfg, cfg["B_E"], seed=1)
    if not time_sampling:
        sample_times, generate_steps = {}, None
        E_t = sample(model, tok, E_prompts, cfg, seed=11)
    else:  # sampling: the product's generate_responses vs plain generate, same prompts and settings
        sample_times, sample_outs = time_rounds(
            {
                "generate_responses": lambda: sample(model, tok, E_prompts, cfg, seed=11),
                "plain_generate": lambda: plain_generate(model, tok, E_prompts, cfg, seed=11),
            },
            cfg["repeats"],
            device,
        )
        E_t = sample_outs["generate_responses"]
    U_prompts = [p for p in random_prompts(cfg, cfg["B_U"], seed=2) for _ in range(cfg["G"])]
    U_t = sample(model, tok, U_prompts, cfg, 12)
    if time_sampling:
        generate_steps = {
            "generate_responses": E_t["logprobs"].shape[1],
            "plain_generate": sample_outs["plain_generate"],
        }
    return E_t, U_t, sample_times, generate_steps


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.measure_memory:
        return measure_memory_child(args)
    cfg = run_config(args)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()

    model = build_model(cfg, args.device, DTYPES[args.dtype], args.qlora)
    E_t, U_t, sample_times, generate_steps = sample_tensors(model, cfg, args.device)
    E, U = to_batches(E_t, U_t, cfg, args.device)
    layout, spec = adam_spec(model)

    # delta-h1 and its passes, interleaved on the same E and U
    fns = work(model, E, U, layout, spec, cfg["max_tokens"], cfg["target"], cfg["u_cache_mb"])
    fns = {k: fn for k, fn in fns.items() if k not in args.skip}
    phase_log, run_delta_h1 = [], fns["delta_h1"]

    def delta_h1_logged():  # keeps each call's own per-phase timings
        result = run_delta_h1()
        phase_log.append(result.timings)
        return result

    fns["delta_h1"] = delta_h1_logged
    pass_times, outs = time_rounds(fns, cfg["repeats"], args.device, keep={"delta_h1", "e_rows"})
    phases = {k: statistics.median(p[k] for p in phase_log[1:]) for k in phase_log[0]}  # [0]: the warm-up
    times = {**pass_times, **sample_times}
    median = ratios({k: statistics.median(v) for k, v in times.items()})
    xbar = outs["delta_h1"].xbar.double()
    check = float((xbar - outs["e_rows"][0].double()).abs().max() / xbar.abs().max())

    memory = {}
    if not args.no_memory:
        kinds = ["plain_fwd_bwd", "train_step", "delta_h1"]
        kinds += (
            ["u_gradient", "u_group_gradients", "e_rows", "e_pass_gradient_only", "e_pass_all_targets"]
            if args.memory_passes
            else []
        )
        with tempfile.TemporaryDirectory() as tmp:
            torch.save((E_t, U_t), Path(tmp) / "batches.pt")
            memory = {k: peak_memory(k, cfg, args, str(Path(tmp) / "batches.pt")) for k in kinds}
        median["memory"] = memory["delta_h1"]["peak_bytes"] / max(1, memory["plain_fwd_bwd"]["peak_bytes"])
        median["memory_vs_train_step"] = memory["delta_h1"]["peak_bytes"] / max(1, memory["train_step"]["peak_bytes"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(fns["delta_h1"], args.device, out.with_name(out.stem + "_profile.txt"))

    rounded = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    report = {
        "ratios": rounded(median),
        "ratios_from_min_times": rounded(ratios({k: min(v) for k, v in times.items()})),
        "targets": TARGETS,
        "times_s": rounded({k: statistics.median(v) for k, v in times.items()}),
        "delta_h1_phases_s": rounded(phases),
        "checks_max_rel_diff": {"delta_h1_xbar_vs_e_rows": check},
        "memory": memory,
        "config": cfg,
        "skipped": args.skip,
        "tokens": {
            "E_sequences": len(E),
            "U_sequences": len(U),
            "columns": [E.input_ids.shape[1], U.input_ids.shape[1]],
            "E_response_tokens": int(E.mask.sum()),
            "U_response_tokens": int(U.mask.sum()),
            "generate_steps": generate_steps,
        },
        "model": {
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": layout.numel,
            "shape": args.shape,
            "dtype": args.dtype,
            "qlora": args.qlora,
            "full": args.full,
            "attn_implementation": "eager",
        },
        "env": environment(args.device),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps({k: report[k] for k in ("ratios", "ratios_from_min_times", "times_s", "delta_h1_phases_s")}))
    print(
        f"{report['env']['device']}, {report['env']['threads']} threads, {args.dtype}{' QLoRA' * args.qlora}, "
        f"memory above baseline (MB): { {k: round(v['peak_bytes'] / 2**20, 1) for k, v in memory.items()} }, "
        f"wall {report['wall_s']} s"
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def environment(device: str) -> dict:
    """Versions, device, threads and the load average (at the time of the call)."""
    return {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
        "python": platform.python_version(),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


if __name__ == "__main__":
    main()
