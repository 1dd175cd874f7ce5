"""The `entropy-probe` console script: one typer subcommand per pipeline stage.

Every stage has the same shape:  entropy-probe STAGE [--params FILE] [-S key.path=value ...] [--out DIR] [--dry-run]
Stage modules expose `run(params, out_dir, dry_run)`; this file only parses options and reports errors.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from . import distributed
from .errors import ProbeError
from .params import Params, load_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Predict the first-order entropy change dH1 = grad H . dtheta of the next RL update.",
)

# stage name -> (module, default output dir from params, one-line help)
STAGES: dict[str, tuple[str, Callable[[Params], str], str]] = {
    "demo": ("stages.demo", lambda p: p.demo.out_dir, "Build the embedded demo: tiny model, task, GRPO run with LoRA + AdamW."),
    "verify": ("stages.verify", lambda p: p.paths.verify, "Load base + adapter + optimizer, verify, write optimizer state."),
    "sample-e": ("stages.sampling", lambda p: p.paths.sample_e, "Sample the E batch: B_E prompts with replacement, G=1."),
    "sample-u": ("stages.sampling", lambda p: p.paths.sample_u, "Sample the U batch: B_U distinct prompts, G responses, rewards."),
    "delta-h1": ("stages.delta_h1", lambda p: p.paths.delta_h1, "Compute dH1 = Xbar . dtheta with standard errors and attributions."),
    "exact": ("stages.exact", lambda p: p.paths.exact, "Exact H, grad H, dH1 and dH(eta) by enumeration (tiny models)."),
    "truth": ("stages.truth", lambda p: p.paths.truth, "Ground-truth dH(eta): apply theta + (eta/lr) dtheta and re-measure."),
    "report": ("stages.report", lambda p: p.paths.report, "Tables and plots of dH1 +- SE, exact and truth across checkpoints."),
}
# stages that run under `torchrun --nproc_per_node=N` (the others are single-process only)
DISTRIBUTED_STAGES = ("sample-e", "sample-u", "delta-h1")


def _make_command(stage: str) -> None:
    module_name, default_out, help_text = STAGES[stage]

    @app.command(name=stage, help=help_text)
    def command(
        params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
        overrides: Optional[list[str]] = typer.Option(None, "-S", "--set", help="override: key.path=value"),
        out: Optional[Path] = typer.Option(None, "--out", help="output dir (default from params)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and exit"),
    ) -> None:
        world = distributed.env_world_size()
        rank = int(os.environ.get("RANK", "0"))
        # under torchrun only rank 0 reports progress; every rank still reports warnings and errors
        level = logging.INFO if rank == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        try:
            if world > 1 and stage not in DISTRIBUTED_STAGES:
                raise ProbeError(
                    f"stage {stage} does not run under torchrun (WORLD_SIZE={world})",
                    f"run it as one process; only {', '.join(DISTRIBUTED_STAGES)} run multi-process",
                )
            params = load_params(params_file, overrides or [])
            if world > 1:  # one whole model per process: "auto" would spread each over all GPUs
                params.checkpoint.device_map = distributed.resolve_device_map(params.checkpoint.device_map)
            out_dir = out if out is not None else Path(default_out(params))
            module = importlib.import_module(module_name)
            runner = getattr(module, "run_" + stage.replace("-", "_"), None) or module.run
            with distributed.process_group(params.checkpoint.device_map):
                runner(params, out_dir, dry_run)
        except ProbeError as exc:
            where = f" (rank {rank})" if world > 1 else ""
            typer.echo(f"entropy-probe {stage}{where}: error: {exc}", err=True)
            raise typer.Exit(code=2) from None


for _stage in STAGES:
    _make_command(_stage)


if __name__ == "__main__":
    app()
