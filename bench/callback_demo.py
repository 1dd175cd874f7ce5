"""The TRL callback inside the embedded demo's real GRPO run, as a picture (README, "Inside a training run").

    python bench/callback_demo.py [--forecast-draws 8] [--out docs/img/callback_forecast.png]

Trains the demo (params.yaml's `demo`, same seed as `make demo`) with `EntropyProbeCallback(every=1)`: at each
step k the callback forecasts the next step's entropy change (δH₁ + δH₂ along simulated trainer steps) and
measures the change since step k − 1 (sampled, common random numbers). The plot puts each forecast made at k − 1
beside the change observed at k (bars: ±2 of the z's denominator √(spread² + SE_obs²), spread = √(SE_F² + σ_T²);
the observed change ±2 SE_obs), with the first-order δH₁ ± 2 SE for comparison, and writes the numbers as JSON
beside the figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from entropy_probe.demo import build_demo  # noqa: E402
from entropy_probe.integrations.trl import PREFIX, EntropyProbeCallback  # noqa: E402
from entropy_probe.params import load_params  # noqa: E402


def scored_steps(history: list[dict]) -> list[dict]:
    """For each step k with an observed change since k − 1 and a forecast logged at k − 1: both, and the z."""
    by_step = {h["step"]: {k.removeprefix(PREFIX): v for k, v in h.items()} for h in history}
    rows = []
    for step, now in sorted(by_step.items()):
        before = by_step.get(step - 1)
        if before is None or "observed_delta_h" not in now or "forecast" not in before:
            continue
        rows.append(
            dict(
                step=step,
                observed=now["observed_delta_h"],
                observed_se=now["observed_se"],
                forecast=before["forecast"],
                forecast_spread=before["forecast_spread"],
                delta_h1=before["delta_h1"],
                se=before["se"],
                z=now.get("z"),
            )
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.axhline(0, color="0.8", lw=0.8)
    ax.errorbar(
        [s - 0.15 for s in x],
        [r["forecast"] for r in rows],
        yerr=[2 * math.hypot(r["forecast_spread"], r["observed_se"]) for r in rows],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="forecast at k − 1 (δH₁ + δH₂ over trainer draws), ±2 sd of z",
    )
    ax.errorbar(
        x,
        [r["delta_h1"] for r in rows],
        yerr=[2 * r["se"] for r in rows],
        fmt="s",
        color="tab:gray",
        ms=4,
        capsize=2,
        label="δH₁ at k − 1 (first order, pool), ±2 SE",
    )
    ax.errorbar(
        [s + 0.15 for s in x],
        [r["observed"] for r in rows],
        yerr=[2 * r["observed_se"] for r in rows],
        fmt="D",
        color="black",
        capsize=3,
        label="observed change k − 1 → k (sampled), ±2 SE",
    )
    ax.set_xlabel("trainer step k")
    ax.set_ylabel("entropy change (nats per token)")
    ax.set_xticks(x)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forecast-draws", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "docs/img/callback_forecast.png"))
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    callbacks: list[EntropyProbeCallback] = []
    with tempfile.TemporaryDirectory() as tmp:
        params.batch_config.dataset_name = str(Path(tmp) / "prompts.jsonl")

        def attach(trainer):
            callbacks.append(EntropyProbeCallback(trainer, 1, params, forecast_draws=args.forecast_draws))
            trainer.add_callback(callbacks[0])

        build_demo(params.demo, Path(tmp), Path(tmp), on_trainer=attach)
    rows = scored_steps(callbacks[0].history)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out)
    zs = [r["z"] for r in rows if r["z"] is not None]
    summary = {
        "steps": rows,
        "z_mean": sum(zs) / len(zs),
        "z_sd": math.sqrt(sum((z - sum(zs) / len(zs)) ** 2 for z in zs) / (len(zs) - 1)),
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"{len(rows)} scored steps, z mean {summary['z_mean']:+.2f}, SD {summary['z_sd']:.2f} -> {out}")
    return summary


if __name__ == "__main__":
    main()
