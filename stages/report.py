"""The `report` stage: one table and a few plots of δH₁ ± SE, exact δH₁ and ground-truth ΔH(η) per checkpoint.

Inputs, per probed checkpoint `name` (from `probe.checkpoints`; with an empty list, the single run in
`paths.{verify,delta_h1,exact,truth}`, named after `checkpoint.path`'s directory):

    <probe.root>/<name>/verify/verify.json          required (step)
    <probe.root>/<name>/delta_h1/delta_h1.json      required (δH₁, SEs, parts, reuse ESS)
    <probe.root>/<name>/delta_h1/attributions.csv   required for the last checkpoint (top U groups)
    <probe.root>/<name>/exact/exact.json            optional (exact δH₁, exact ΔH(η))
    <probe.root>/<name>/truth/truth.json            optional (ΔH(η) by SNIS and by fresh samples)
    <probe.root>/<name>/whatif/whatif.json          optional, last checkpoint (tokens and what-if rows)

Outputs (all in one staged directory, so a failed run leaves nothing): report.md (also printed),
report.json (`Report`: the table's numbers by checkpoint), metrics/<name>.json (`CheckpointMetrics`: the
few numbers DVC tracks as metrics), plots/*.csv (DVC plots) and PNGs. The numbers: `entropy_probe.reporting`.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from entropy_probe import files, outputs
from entropy_probe.artifacts.delta_h1 import ATTRIBUTIONS_FILE, DeltaH1Report
from entropy_probe.artifacts.exact import ExactReport
from entropy_probe.artifacts.report import CheckpointMetrics, Report
from entropy_probe.artifacts.truth import TruthReport
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.artifacts.whatif import WhatIfReport
from entropy_probe.errors import ProbeError
from entropy_probe.params import Params
from entropy_probe.reporting import (
    UNITS,
    Probe,
    UGroup,
    checkpoint_probe,
    markdown,
    plot_delta_h1,
    plot_delta_h_eta,
    plot_tables,
    plot_top_u,
    top_u_groups,
)
from entropy_probe.whatif_result import whatif_markdown

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInputs:
    """Where one probed checkpoint's stage outputs live (directories)."""

    name: str
    verify: Path
    delta_h1: Path
    exact: Path  # optional
    truth: Path  # optional
    whatif: Path  # optional (read for the last checkpoint)

    @property
    def attributions(self) -> Path:
        return self.delta_h1 / ATTRIBUTIONS_FILE

    def files(self, last: bool) -> list[tuple[str, Path]]:
        """(required/optional, file) in the order the report reads them; attributions only for the last."""
        wanted = [
            ("required", VerifyReport.path(self.verify)),
            ("required", DeltaH1Report.path(self.delta_h1)),
            ("optional", ExactReport.path(self.exact)),
            ("optional", TruthReport.path(self.truth)),
        ]
        if not last:
            return wanted
        return (
            wanted[:2] + [("required", self.attributions)] + wanted[2:] + [("optional", WhatIfReport.path(self.whatif))]
        )


def checkpoint_inputs(params: Params) -> list[CheckpointInputs]:
    """One entry per probed checkpoint, in `probe.checkpoints` order (the last one gets the top-U list)."""
    probes = params.probe.checkpoints
    if not probes:
        p = params.paths
        name = Path(params.checkpoint.path).name or "checkpoint"
        return [CheckpointInputs(name, Path(p.verify), Path(p.delta_h1), Path(p.exact), Path(p.truth), Path(p.whatif))]
    names = [c.name for c in probes]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ProbeError(f"probe.checkpoints names '{dup}' twice", "give every probed checkpoint its own name")
    bad = next((n for n in names if n in ("", ".", "..") or "/" in n), None)
    if bad is not None:  # it names a directory under probe.root and a metrics file
        raise ProbeError(f"probe.checkpoints has the name {bad!r}, not a plain file name", "rename that checkpoint")
    root = Path(params.probe.root)
    subdirs = ("verify", "delta_h1", "exact", "truth", "whatif")
    return [CheckpointInputs(n, *(root / n / sub for sub in subdirs)) for n in names]


def _required(path: Path, name: str) -> Path:
    if not path.exists():
        raise ProbeError(f"checkpoint '{name}' has no {path.name} ({path})", "run `dvc repro` to compute it")
    return path


def load_probe(inp: CheckpointInputs, default_multipliers: list[float]) -> Probe:
    """Read one checkpoint's artifacts (exact and truth when present) into its table row and ΔH(η) curve."""
    name = inp.name
    delta_h1 = DeltaH1Report.read(_required(DeltaH1Report.path(inp.delta_h1), name).parent)
    verify = VerifyReport.read(_required(VerifyReport.path(inp.verify), name).parent)
    exact = ExactReport.read(inp.exact) if ExactReport.path(inp.exact).exists() else None
    truth = TruthReport.read(inp.truth) if TruthReport.path(inp.truth).exists() else None
    return checkpoint_probe(name, verify, delta_h1, exact, truth, default_multipliers)


def read_u_groups(path: Path, name: str) -> list[UGroup]:
    """The U rows of delta-h1's attributions.csv (columns batch, contribution, prompt, responses), each with its
    leave-one-group-out contribution where delta-h1 wrote one: through gradient clipping the linearised one
    is ~0 (clipping rescales g for every group), while leaving the group out still moves δH₁."""
    with open(_required(path, name), newline="") as f:
        reader = csv.DictReader(f)
        need = {"batch", "contribution", "prompt", "responses"}
        if not need <= set(reader.fieldnames or []):
            raise ProbeError(f"{path} lacks columns {sorted(need - set(reader.fieldnames or []))}", "rerun delta-h1")
        rows = [r for r in reader if r["batch"] == "U"]
    try:
        return [
            UGroup(float(r.get("contribution_loo") or r["contribution"]), r["prompt"], r["responses"]) for r in rows
        ]
    except ValueError:
        raise ProbeError(f"{path} has a non-numeric contribution", "rerun delta-h1 (dvc repro)") from None


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Read every probed checkpoint's outputs; write report.md/json, metrics, plots/*.csv and PNGs into `out_dir`.

    Returns the markdown report without its final newline: the stage's result, which the CLI prints once.
    """
    inputs = checkpoint_inputs(params)
    if dry_run:
        lines = [f"report plan: read {len(inputs)} checkpoint(s) and write {out_dir}/"]
        for inp in inputs:
            for kind, path in inp.files(last=inp is inputs[-1]):
                lines.append(f"  {inp.name}: {path} [{kind}]{'' if path.exists() else '  (missing)'}")
        return "\n".join(lines)

    probes = [load_probe(inp, params.truth.eta_multipliers) for inp in inputs]
    targets = sorted({p.row.target for p in probes})
    if len(targets) > 1:
        raise ProbeError(
            f"the checkpoints were probed with different entropy targets {targets}",
            "rerun delta-h1 with one estimator.entropy for all (dvc repro)",
        )
    last = inputs[-1].name
    top = top_u_groups(read_u_groups(inputs[-1].attributions, last))
    unit = UNITS[targets[0]]
    text = markdown(probes, top, last)
    whatif_path = WhatIfReport.path(inputs[-1].whatif)
    if whatif_path.exists():
        text += "\n" + whatif_markdown(WhatIfReport.read(whatif_path.parent), last)

    with outputs.staged_output_dir(out_dir) as tmp:
        files.write_text(tmp / "report.md", text)
        Report(target=targets[0], checkpoints={p.name: p.row for p in probes}).write(tmp)
        for p in probes:
            CheckpointMetrics.of(p.row).write(tmp, p.name)
        for fname, body in plot_tables(probes, top).items():
            files.write_text(tmp / "plots" / fname, body)
        plot_delta_h1(probes, unit, tmp / "delta_h1_by_checkpoint.png")
        plot_delta_h_eta(probes, unit, tmp / "delta_h_vs_eta.png")
        plot_top_u(top, last, unit, tmp / "top_u.png")
    log.info("report: wrote %s (%d checkpoints)", out_dir, len(probes))
    return text.removesuffix("\n")
