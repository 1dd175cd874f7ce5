"""The `demo` stage: the embedded default checkpoint (tiny Qwen2, arithmetic task, TRL GRPO with LoRA + AdamW).

Writes into `demo.out_dir` (staged: renamed into place on success):
    prompts.jsonl  base/  run/checkpoint-{save_steps, 2*save_steps, ..}/  demo.json (`DemoReport`)
The training itself: `entropy_probe.demo`.
"""

from __future__ import annotations

from pathlib import Path

from entropy_probe.demo import build_demo, check_sizes, checkpoint_steps
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params


def plan(params: Params, out_dir: Path) -> dict[str, object]:
    """What a run would build, for --dry-run."""
    demo = params.demo
    return {
        "out_dir": str(out_dir),
        "model": f"Qwen2 hidden {demo.hidden_size}, {demo.num_layers} layers, {demo.num_heads} heads",
        "n_prompts": (demo.max_operand + 1) ** 2,
        "warmup": f"{demo.warmup_steps} full-batch steps at lr {demo.warmup_lr}",
        "grpo": (
            f"{demo.rl_steps} steps x {demo.prompts_per_step} prompts x {demo.num_generations} generations "
            f"= {demo.rl_steps * demo.prompts_per_step * demo.num_generations} completions, LoRA r={demo.lora_rank}, "
            f"lr {demo.rl_lr} (linear)"
        ),
        "checkpoints": [str(out_dir / "run" / f"checkpoint-{s}") for s in checkpoint_steps(demo)],
    }


def run(params: Params, out_dir: str | Path | None = None, dry_run: bool = False) -> str | None:
    """Build the demo into `out_dir` (default demo.out_dir); returns the one-line summary."""
    out_dir = Path(out_dir if out_dir is not None else params.demo.out_dir)
    check_sizes(params.demo)
    if dry_run:
        return "demo plan:\n" + "\n".join(f"  {key}: {value}" for key, value in plan(params, out_dir).items())
    with staged_output_dir(out_dir) as tmp:
        report = build_demo(params.demo, tmp, out_dir)
        report.write(tmp)
    return (
        f"demo: reward rate {report.reward_rate_base:.3f} -> {report.reward_rate_final:.3f} after "
        f"{params.demo.rl_steps} GRPO steps, {len(report.checkpoints)} checkpoints -> {out_dir} "
        f"({report.seconds['total']:.1f}s)"
    )
