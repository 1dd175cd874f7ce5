"""The `entropy-probe` console script: one typer subcommand per pipeline stage.

Every stage has the same shape:  entropy-probe STAGE [--params FILE] [-S key.path=value ...] [--out DIR] [--dry-run]
Stage modules expose `run(params, out_dir, dry_run)`; this file parses options, checks the output dir
before any work (`protected_inputs`, `outputs.claim_output_dir`) and reports errors.
The library is imported inside the command, not here: `--help` and `STAGE --help` must not load torch or
the model libraries (tests/test_startup.py checks which modules they load).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import typer

from entropy_probe.errors import ProbeError

if TYPE_CHECKING:
    from entropy_probe.params import Params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Predict the first-order entropy change dH1 = grad H . dtheta of the next RL update.",
)

# stage name -> (module, default output dir from params, one-line help)
STAGES: dict[str, tuple[str, Callable[[Params], str], str]] = {
    "demo": (
        "stages.demo",
        lambda p: p.demo.out_dir,
        "Build the embedded demo: tiny model, task, GRPO run with LoRA + AdamW.",
    ),
    "verify": (
        "stages.verify",
        lambda p: p.paths.verify,
        "Load base + adapter + optimizer, verify, write optimizer state.",
    ),
    "sample-e": ("stages.sample", lambda p: p.paths.sample_e, "Sample the E batch: B_E prompts with replacement, G=1."),
    "sample-u": (
        "stages.sample",
        lambda p: p.paths.sample_u,
        "Sample the U batch: B_U distinct prompts, G responses, rewards.",
    ),
    "delta-h1": (
        "stages.delta_h1",
        lambda p: p.paths.delta_h1,
        "Compute dH1 = Xbar . dtheta with standard errors and attributions.",
    ),
    "exact": (
        "stages.exact",
        lambda p: p.paths.exact,
        "Exact H, grad H, dH1 and dH(eta) by enumeration (tiny models).",
    ),
    "truth": (
        "stages.truth",
        lambda p: p.paths.truth,
        "Ground-truth dH(eta): apply theta + (eta/lr) dtheta and re-measure.",
    ),
    "whatif": (
        "stages.whatif",
        lambda p: p.paths.whatif,
        "Per-token shares of dH1 over U, what-if updates and the entropy-neutral bonus, from delta-h1's Xbar.",
    ),
    "report": (
        "stages.report",
        lambda p: p.paths.report,
        "Tables and plots of dH1 +- SE, exact and truth across checkpoints.",
    ),
    "trajectory": (
        "stages.trajectory",
        lambda p: p.trajectory.out_dir,
        "Score the probe against a run's own steps: observed dH vs predicted dH1 per checkpoint pair.",
    ),
}
# stages that run under `torchrun --nproc_per_node=N` (the others are single-process only)
DISTRIBUTED_STAGES = ("sample-e", "sample-u", "delta-h1")
# stage name -> the paths.* artifacts it reads (report's are listed by `protected_inputs`)
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "demo": (),
    "verify": (),
    "sample-e": (),
    "sample-u": (),
    "delta-h1": ("verify", "sample_e", "sample_u"),
    "exact": ("verify", "delta_h1", "sample_e"),
    "truth": ("delta_h1", "sample_e"),
    "whatif": ("verify", "delta_h1", "sample_e", "sample_u"),
    "report": ("verify", "delta_h1", "exact", "truth"),
    "trajectory": (),
}


def protected_inputs(stage: str, params: Params) -> dict[str, str]:
    """{params key: path} that `stage`'s output dir must not be, be inside, or contain.

    Every stage but demo (which creates its checkpoints) keeps clear of every checkpoint named in params
    and of a local dataset; each also of the artifacts it reads (report: per probed checkpoint, in
    probe.root). base_model and dataset_name count only when they exist locally (else they are hub names).
    """
    if stage == "demo":
        return {}
    ck = params.checkpoint
    paths = {
        "checkpoint.path": ck.path,
        "checkpoint.optimizer_path": ck.optimizer_path,
        "sampling.checkpoint": params.sampling.checkpoint,
        **{f"probe.checkpoints.{c.name}": c.path for c in params.probe.checkpoints},
    }
    local = {"checkpoint.base_model": ck.base_model, "batch_config.dataset_name": params.batch_config.dataset_name}
    paths.update({key: value for key, value in local.items() if value is not None and Path(value).exists()})
    if stage == "trajectory":  # it reads every checkpoint of the run dir
        paths["trajectory.run_dir"] = params.trajectory.run_dir
    if stage == "delta-h1" and params.update.rule == "observed":  # it reads the next checkpoint too
        nxt = params.update.next_checkpoint
        paths["update.next_checkpoint"] = nxt if nxt is not None else str(Path(ck.path).parent)  # (the run dir)
    if stage == "report" and params.probe.checkpoints:
        root = Path(params.probe.root)
        for c in params.probe.checkpoints:
            paths.update({f"probe.root/{c.name}/{a}": str(root / c.name / a) for a in STAGE_INPUTS[stage]})
    else:
        paths.update({f"paths.{a}": getattr(params.paths, a) for a in STAGE_INPUTS[stage]})
    return {key: value for key, value in paths.items() if value is not None}


def _quiet_libraries() -> None:
    """Keep the console to what the user needs: no library chatter, no progress bars in logs.

    bitsandbytes logs a warning about an optional CPU kernel package on import (even without QLoRA), and on
    an AVX512-BF16 CPU fetches that kernel through `kernels`, whose hub module warns "Skipping publisher trust
    check for 'kernels-community/quantization-bitsandbytes'" when the hub is offline; peft calls a property
    transformers deprecated (a FutureWarning the user cannot act on). Progress bars are drawn only on a
    terminal: our tqdm loops use disable=None, and the hub/transformers bars read this variable.
    """
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@contextlib.contextmanager
def _params_reads(stage: str, overrides: list[str], warn: bool, read_before: set[str]) -> Iterator[None]:
    """Record the params keys the stage reads in the block, and after it ran:
    - with ENTROPY_PROBE_RECORD_PARAMS=FILE, append {stage, reads} to FILE (one JSON line per run): the
      pipeline test checks them against the stage's params in dvc.yaml;
    - when `warn`, say on stderr which `-S` overrides the stage never read (nor the CLI for it: `read_before`,
      the default --out's key): a setting that has no effect on this stage must not pass without a word (the
      user may believe it changed the result)."""
    log_file = os.environ.get("ENTROPY_PROBE_RECORD_PARAMS")
    if not log_file and not (warn and overrides):
        yield
        return
    from entropy_probe.params import recording_reads

    with recording_reads() as reads:
        yield
    if log_file:
        with open(log_file, "a") as f:
            f.write(json.dumps({"stage": stage, "reads": sorted(reads)}) + "\n")
    if warn:
        for text in unread_overrides(overrides, reads | read_before):
            typer.echo(f"entropy-probe {stage}: warning: -S {text} was not read by this stage (no effect)", err=True)


def unread_overrides(overrides: list[str], reads: set[str]) -> list[str]:
    """The overrides whose key is no read key, nor a section holding one, nor inside one (probe.checkpoints.x)."""

    def read(key: str) -> bool:
        return any(r == key or r.startswith(key + ".") or key.startswith(r + ".") for r in reads)

    return [text for text in overrides if not read(text.split("=", 1)[0].strip())]


def _make_command(stage: str) -> None:
    module_name, default_out, help_text = STAGES[stage]

    @app.command(name=stage, help=help_text)
    def command(
        params_file: Path = typer.Option(Path("params.yaml"), "--params", help="params file"),
        overrides: Optional[list[str]] = typer.Option(None, "-S", "--set", help="override: key.path=value"),
        out: Optional[Path] = typer.Option(None, "--out", help="output dir (default from params)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and exit"),
    ) -> None:
        from entropy_probe import distributed, outputs
        from entropy_probe.params import load_params, recording_reads

        world = distributed.env_world_size()
        rank = int(os.environ.get("RANK", "0"))
        # under torchrun only rank 0 reports progress; every rank still reports warnings and errors
        level = logging.INFO if rank == 0 else logging.WARNING
        logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
        _quiet_libraries()
        try:
            if world > 1 and stage not in DISTRIBUTED_STAGES:
                raise ProbeError(
                    f"stage {stage} does not run under torchrun (WORLD_SIZE={world})",
                    f"run it as one process; only {', '.join(DISTRIBUTED_STAGES)} run multi-process",
                )
            params = load_params(params_file, overrides or [])
            if world > 1:  # one whole model per process: "auto" would spread each over all GPUs
                params.checkpoint.device_map = distributed.resolve_device_map(params.checkpoint.device_map)
            with recording_reads() as out_key:  # the stage writes where this key says: it counts as read
                out_dir = out if out is not None else Path(default_out(params))
            # before any work (and before the stage's imports): refuse an --out the stage may not replace;
            # only rank 0 writes, so only it takes the lock (the others just check)
            claim = outputs.claim_output_dir(out_dir, stage, protected_inputs(stage, params), dry_run or rank != 0)
            with claim:
                module = importlib.import_module(module_name)
                runner = getattr(module, "run_" + stage.replace("-", "_"), None) or module.run
                # a dry run reads only what its plan needs; other ranks stay quiet (rank 0 warns)
                reads = _params_reads(stage, overrides or [], not dry_run and rank == 0, out_key)
                with distributed.process_group(params.checkpoint.device_map), reads:
                    summary = runner(params, out_dir, dry_run)
            if isinstance(summary, str) and rank == 0:  # the result line: stdout (progress and diagnostics: stderr)
                typer.echo(summary)
        except ProbeError as exc:
            where = f" (rank {rank})" if world > 1 else ""
            typer.echo(f"entropy-probe {stage}{where}: error: {exc}", err=True)
            raise typer.Exit(code=2) from None


for _stage in STAGES:
    _make_command(_stage)


if __name__ == "__main__":
    app()
