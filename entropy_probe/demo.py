"""The embedded demo checkpoint's training, built offline on a CPU in well under a minute.

1. tokenizer + tiny Qwen2 from `entropy_probe.tiny`; the arithmetic task "a+b=" -> "a+b" (prompts.jsonl).
2. Supervised warm-up (full fine-tune, AdamW) on prompt + answer + eos, cross-entropy on the answer
   and eos tokens only, stopped early so that the policy at temperature 1 is right about half the
   time: a GRPO group then usually holds both rewards, so advantages are non-zero. Saved as `base/`.
3. A real RL run: TRL's GRPOTrainer with a LoRA adapter and AdamW (linear schedule), reward
   `exact_number`, checkpoints `run/checkpoint-N/` in the Trainer's own layout, plus a plain
   `trainer_config.json` (the trainer settings the probe reads), so the probe never has to unpickle
   training_args.bin.

`build_demo` writes, into a (staging) directory: prompts.jsonl  base/  run/checkpoint-{save_steps, ..}/
and returns what demo.json records (`DemoReport`). The `demo` stage (stages/demo.py) stages and writes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from .artifacts.demo import GRPO_KEYS, DemoReport
from .checkpoint import TRAINER_CONFIG
from .errors import ProbeError
from .files import write_json, write_text
from .params import DemoParams
from .task import exact_number, make_arithmetic_prompts, score_responses
from .tiny import build_model, build_tokenizer, one_thread
from .trainer_config import trainer_config_from_args

log = logging.getLogger(__name__)

EVAL_SAMPLES_PER_PROMPT = 4  # reward rate = mean over every prompt x 4 samples at temperature 1
EVAL_SEED = 12345
MAX_COMPLETION_LENGTH = 3  # answers have <= 2 digits, + eos
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FULL_MODEL_FILES = ("model.safetensors", "config.json")
CHECKPOINT_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
    "rng_state.pth",
)


def checkpoint_steps(demo: DemoParams) -> list[int]:
    """Steps the Trainer saves at: every save_steps, and (as Trainer does) at the final step."""
    steps = list(range(demo.save_steps, demo.rl_steps + 1, demo.save_steps))
    return steps if steps and steps[-1] == demo.rl_steps else steps + [demo.rl_steps]


def check_sizes(demo: DemoParams) -> None:
    """Refuse demo sizes the model or the task cannot have."""
    if demo.hidden_size % demo.num_heads:
        raise ProbeError(
            f"demo.hidden_size {demo.hidden_size} is not divisible by demo.num_heads {demo.num_heads}",
            "pick sizes with hidden_size % num_heads == 0",
        )
    if demo.prompts_per_step > (demo.max_operand + 1) ** 2:
        raise ProbeError(
            f"demo.prompts_per_step {demo.prompts_per_step} exceeds the {(demo.max_operand + 1) ** 2} prompts",
            "lower demo.prompts_per_step or raise demo.max_operand",
        )


# ---------------------------------------------------------------- warm-up


def sft_batch(tokenizer, records: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+eos with labels = -100 outside the answer+eos tokens."""
    prompts = [tokenizer.encode(r["prompt"]) for r in records]
    answers = [tokenizer.encode(r["answer"]) + [tokenizer.eos_token_id] for r in records]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(records), width), tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def warmup(model, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    """Full-batch AdamW on mean token cross-entropy; deterministic (no data order, no dropout)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def reward_rate(model, tokenizer, records: list[dict], samples_per_prompt: int, seed: int) -> float:
    """Mean exact_number reward of samples at temperature 1 (no top-k/top-p), each prompt equally often."""
    rows = [r for r in records for _ in range(samples_per_prompt)]
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)  # left padding
    was_training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_COMPLETION_LENGTH,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = score_responses(exact_number, responses, [r["answer"] for r in rows])
    return sum(rewards) / len(rewards)


def save_base(model, tokenizer, path: Path) -> None:
    """save_pretrained (fp32 safetensors) + tokenizer; config.json also asks for eager attention, so a plain
    from_pretrained gets what every stage loads (SDPA's CPU kernel has no double backward; the tangents need one)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["attn_implementation"] = "eager"
    write_json(path / "config.json", config)


# ---------------------------------------------------------------- GRPO


def exact_number_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """TRL reward adapter: `exact_number` against the dataset's "answer" column (completions lack eos)."""
    return score_responses(exact_number, completions, answer)


def grpo_config(demo: DemoParams, run_dir: Path, beta: float = 0.0):
    """The demo's GRPOConfig; beta: TRL's KL coefficient (0 in the demo; tests set it)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(run_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=demo.seed,
        data_seed=demo.seed,
        max_steps=demo.rl_steps,
        save_strategy="steps",
        save_steps=demo.save_steps,
        save_only_model=False,
        learning_rate=demo.rl_lr,
        weight_decay=demo.rl_weight_decay,  # non-zero so the probe's decoupled-decay term is exercised
        optim="adamw_torch",
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        per_device_train_batch_size=demo.prompts_per_step * demo.num_generations,  # completions per step
        gradient_accumulation_steps=1,
        num_generations=demo.num_generations,
        max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=1.0,
        beta=beta,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_level="error",
    )


def _progress_callback():
    """A Trainer callback that logs one concise line per optimizer step (instead of raw dict prints)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                log.info(
                    "  grpo step %d/%d  reward %.3f  loss %+.4f  lr %.2e",
                    state.global_step,
                    state.max_steps,
                    logs["reward"],
                    logs.get("loss", float("nan")),
                    logs.get("learning_rate", float("nan")),
                )

    return Progress()


def train_grpo(
    model, tokenizer, records: list[dict], demo: DemoParams, run_dir: Path, base_name: str, on_trainer=None, beta=0.0
):
    """GRPOTrainer + LoRA on q/k/v/o (demo.finetune lora) or on every parameter (full); returns the trainer
    (its .model is the trained PeftModel, or `model` itself).

    The adapter names `base_name` as its base; `model` is wrapped in place (base weights stay frozen).
    `on_trainer(trainer)` runs before training (e.g. to add an `EntropyProbeCallback`). beta > 0 (TRL's KL penalty):
    a full-parameter run loads its reference from `base_name`, which must exist then.
    """
    import datasets
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    # PEFT writes `name_or_path` into adapter_config.json's base_model_name_or_path: the FINAL base dir,
    # not the staging dir the base was saved into.
    model.name_or_path = base_name
    model.config.name_or_path = base_name
    lora = LoraConfig(
        r=demo.lora_rank,
        lora_alpha=2 * demo.lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    with _offline_and_quiet():
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=exact_number_reward,
            args=grpo_config(demo, run_dir, beta),
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=tokenizer,
            peft_config=lora if demo.finetune == "lora" else None,
            callbacks=[_progress_callback()],
        )
        trainer.remove_callback(PrinterCallback)  # its raw dict prints: replaced by _progress_callback
        if on_trainer is not None:
            on_trainer(trainer)
        trainer.train()
    return trainer


@contextlib.contextmanager
def _offline_and_quiet():
    """HF_HUB_OFFLINE=1 while training, and no known-harmless warnings.

    When PEFT saves a checkpoint it looks for `<base>/config.json` to see whether the vocabulary
    changed; the final base dir does not exist yet (we train in a staging dir), so without offline
    mode it would query the Hub under that name. The vocabulary is never changed here.
    """
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Could not find a config file")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _quiet_libraries() -> None:
    # set before the imports below: bitsandbytes warns at import time about an optional CPU 4-bit kernel
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- the whole build


def build_demo(demo: DemoParams, directory: Path, final_dir: Path, on_trainer=None) -> DemoReport:
    """Warm-up, base, GRPO run and checkpoints into `directory`, named (in adapter configs and in the
    returned report) by `final_dir`, where `directory` will be moved. Deterministic given `demo.seed`.
    `on_trainer(trainer)`: called with the GRPOTrainer before it trains."""
    _quiet_libraries()
    with one_thread():
        return _build(demo, Path(directory), Path(final_dir), on_trainer)


def warm_base(demo: DemoParams):
    """(prompt records, tokenizer, the tiny Qwen2 after its supervised warm-up, the warm-up losses): the policy
    GRPO starts from, the same on every call (and every process) for the same demo params."""
    records = make_arithmetic_prompts(demo.max_operand)
    tokenizer = build_tokenizer()
    model = build_model(
        vocab_size=len(tokenizer),
        hidden_size=demo.hidden_size,
        num_layers=demo.num_layers,
        num_heads=demo.num_heads,
        seed=demo.seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=demo.tie_word_embeddings,
    )
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo: tiny Qwen2 with %d parameters, vocab %d, %d prompts", n_params, len(tokenizer), len(records))
    with torch.random.fork_rng():
        torch.manual_seed(demo.seed)
        losses = warmup(model, sft_batch(tokenizer, records), demo.warmup_steps, demo.warmup_lr)
    return records, tokenizer, model, losses


def _build(demo: DemoParams, tmp: Path, out_dir: Path, on_trainer=None) -> DemoReport:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    records, tokenizer, model, losses = warm_base(demo)
    n_params = sum(p.numel() for p in model.parameters())  # before GRPO wraps it with the adapter
    write_text(tmp / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    rate_base = reward_rate(model, tokenizer, records, EVAL_SAMPLES_PER_PROMPT, EVAL_SEED)
    save_base(model, tokenizer, tmp / "base")
    seconds["warmup"] = time.perf_counter() - t0
    log.info(
        "demo: warm-up %d steps, loss %.3f, reward rate at T=1 %.3f (%.1fs)",
        demo.warmup_steps,
        losses[-1] if losses else float("nan"),
        rate_base,
        seconds["warmup"],
    )

    t1 = time.perf_counter()
    trainer = train_grpo(model, tokenizer, records, demo, tmp / "run", str(out_dir / "base"), on_trainer)
    policy = trainer.model
    seconds["grpo"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    rate_final = reward_rate(policy, tokenizer, records, EVAL_SAMPLES_PER_PROMPT, EVAL_SEED)
    seconds["eval"] = time.perf_counter() - t2
    log.info(
        "demo: GRPO %d steps (%.1fs); reward rate %.3f -> %.3f", demo.rl_steps, seconds["grpo"], rate_base, rate_final
    )

    checkpoints = sorted((tmp / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    expected = [f"checkpoint-{s}" for s in checkpoint_steps(demo)]
    if [c.name for c in checkpoints] != expected:
        raise RuntimeError(f"trainer wrote {[c.name for c in checkpoints]}, expected {expected}")
    for ckpt in checkpoints:
        weights = ADAPTER_FILES if demo.finetune == "lora" else FULL_MODEL_FILES
        missing = [f for f in (*weights, *CHECKPOINT_FILES) if not (ckpt / f).exists()]
        if missing:
            raise RuntimeError(f"{ckpt.name} lacks {missing}")
        # the same settings training_args.bin pickles, as JSON: read without trusting a pickle
        write_json(ckpt / TRAINER_CONFIG, trainer_config_from_args(trainer.args))
    seconds["total"] = time.perf_counter() - t0
    return DemoReport(
        n_params=n_params,
        n_trainable=sum(p.numel() for p in policy.parameters() if p.requires_grad),
        vocab_size=len(tokenizer),
        n_prompts=len(records),
        warmup_final_loss=losses[-1] if losses else None,
        reward_rate_base=rate_base,
        reward_rate_final=rate_final,
        reward_rate_samples=len(records) * EVAL_SAMPLES_PER_PROMPT,
        grpo={k: getattr(trainer.args, k) for k in GRPO_KEYS},
        seconds={k: round(v, 2) for k, v in seconds.items()},
        base=str(out_dir / "base"),
        checkpoints=[str(out_dir / "run" / c.name) for c in checkpoints],
        params=demo,
    )
