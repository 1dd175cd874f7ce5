"""Test helper: write a checkpoint exactly in the layout a Hugging Face / TRL Trainer writes.

A tiny Qwen2 base is saved and reloaded with from_pretrained (so the adapter records its path), wrapped
with LoRA, and handed to a real `transformers.Trainer` only to build the optimizer and scheduler the way
training does (two AdamW param groups: decay then no-decay; linear LambdaLR). A few real steps
(backward, grad-norm clip, optimizer.step, scheduler.step) follow, then the Trainer's files are saved:
adapter (save_pretrained), optimizer.pt, scheduler.pt, trainer_state.json (global_step + log_history
with the learning rate of each applied step), training_args.bin (a pickled trl GRPOConfig), tokenizer.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "v_proj"]


@dataclass
class TrainerCkpt:
    dir: Path  # .../run/checkpoint-N (adapter files + optimizer.pt + ...)
    base_dir: Path
    model: torch.nn.Module  # the live PeftModel after training
    optimizer: torch.optim.Optimizer  # the live optimizer (its state[param] is the ground truth)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lr_last: float  # lr of the last applied step
    lr_next: float  # lr the optimizer holds for the next step
    no_grad_name: str | None
    args: object  # the GRPOConfig pickled into training_args.bin


def save_base(root: Path, hidden_size: int = 64, seed: int = 0) -> Path:
    from entropy_probe.tiny import build_model, build_tokenizer

    base_dir = root / "base"
    build_model(hidden_size=hidden_size, num_layers=2, num_heads=4, seed=seed).save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    return base_dir


def grpo_args(out: Path, lr: float, weight_decay: float, max_grad_norm: float = 1.0, optim: str = "adamw_torch"):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to=[],
        learning_rate=lr,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=max_grad_norm,
        optim=optim,
        loss_type="grpo",
        scale_rewards="none",
        temperature=0.7,
        top_p=0.95,
        beta=0.0,
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=8,
    )


def write_trainer_checkpoint(
    root: Path,
    *,
    steps: int = 3,
    total_steps: int = 6,
    rank: int = 2,
    hidden_size: int = 64,
    lr: float = 1e-2,
    weight_decay: float = 0.1,
    lora_bias: bool = True,
    no_grad_param: str | None = None,
    seed: int = 0,
    base_dir: Path | None = None,
    optim: str = "adamw_torch",
) -> TrainerCkpt:
    """Train `steps` of `total_steps` (linear schedule; steps == total_steps ⇒ next lr is 0) and save.

    lora_bias=True gives LoRA-B biases: trainable, no weight decay, interleaved with the decay params in
    named_parameters() order, so the no-decay group is non-empty and order matters.
    no_grad_param: a substring of one trainable name whose gradient is dropped every step (no Adam state).
    optim: the Trainer's `optim` (e.g. "paged_adamw_8bit" for a bitsandbytes state).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerState

    from entropy_probe.tiny import build_tokenizer

    root = Path(root)
    base_dir = base_dir or save_base(root, hidden_size=hidden_size, seed=seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS, lora_bias=lora_bias)
    model = get_peft_model(base, config)
    run = root / "run"
    args = grpo_args(run, lr, weight_decay, optim=optim)
    trainer = Trainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler

    no_grad_name = None
    if no_grad_param is not None:
        no_grad_name = next(n for n, p in model.named_parameters() if p.requires_grad and no_grad_param in n)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed + 2)
    log_history, lr_last = [], None
    model.train()
    for step in range(1, steps + 1):
        ids = torch.randint(0, 14, (4, 10), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if no_grad_name is not None:
            params[no_grad_name].grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        lr_last = scheduler.get_last_lr()[0]  # the Trainer logs the lr *before* scheduler.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log_history.append(
            {
                "epoch": step / total_steps,
                "grad_norm": grad_norm.item(),
                "learning_rate": lr_last,
                "loss": loss.item(),
                "step": step,
            }
        )
    model.eval()

    ckpt = run / f"checkpoint-{steps}"
    with warnings.catch_warnings():  # peft mistakes 1-D lora_B biases for unGathered ZeRO-3 shards
        warnings.simplefilter("ignore")
        model.save_pretrained(ckpt)  # adapter_model.safetensors + adapter_config.json
    build_tokenizer().save_pretrained(ckpt)  # the GRPOTrainer saves its processing_class too
    torch.save(optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(scheduler.state_dict(), ckpt / "scheduler.pt")
    TrainerState(global_step=steps, max_steps=total_steps, log_history=log_history).save_to_json(
        str(ckpt / "trainer_state.json")
    )
    torch.save(args, ckpt / "training_args.bin")
    return TrainerCkpt(
        dir=ckpt,
        base_dir=base_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        lr_last=lr_last,
        lr_next=optimizer.param_groups[0]["lr"],
        no_grad_name=no_grad_name,
        args=args,
    )


def set_base_in_adapter_config(ckpt_dir: Path, base: str) -> None:
    path = Path(ckpt_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base
    path.write_text(json.dumps(cfg))


def adamw_ulps(this, nxt, delta_theta) -> float:
    """How far the observed step θ(next) − θ(this) (flat, `this.layout` order) is from torch AdamW's step built
    from `nxt`'s moments and step count with `this`'s stored (next-step) lr and each group's decay, in float32 ulps
    of each tensor's largest |θ| (the largest over the tensors). `this`, `nxt`: Probes of consecutive checkpoints."""
    from tolerances import FP32_EPS

    delta = this.layout.unflatten(delta_theta)
    theta = {n: p.detach().double() for n, p in this.model.named_parameters()}
    worst = 0.0
    for group in this.optimizer.groups:
        (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        for n in group["names"]:
            m, v, t = nxt.optimizer.exp_avg[n].double(), nxt.optimizer.exp_avg_sq[n].double(), nxt.optimizer.step[n]
            step = -lr * wd * theta[n] - lr / (1 - beta1**t) * m / ((v / (1 - beta2**t)).sqrt() + eps)
            worst = max(worst, float((delta[n] - step).abs().max()) / float(theta[n].abs().max() * FP32_EPS))
    return worst
