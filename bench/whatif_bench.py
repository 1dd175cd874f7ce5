"""The cost of tokens and what-if (`whatif.what_if`, docs/math.md §12) as ratios to a plain forward+backward.

    python bench/whatif_bench.py [--quick] [--out bench/results/whatif_bench.json]
    python bench/whatif_bench.py --shape qwen2.5-0.5b --layers 1 --quick --out bench/results/whatif_bench_qwen05b_1layer.json

The model, E and U (sampled by the product's `generate_responses`, or random ids for `--shape`), AdamW state and
plain pass are bench.py's (imported). Given X̄ (one untimed E pass, as delta-h1 leaves it), the pieces of
`what_if` are timed on the same E and U, one warm-up call, then the median of `repeats` interleaved rounds:

    tokens             = t(whatif.token_pass: u = linearised X̄, passes.u_token_terms along u)   / t(plain U)
    row: NAME          = t(one what-if row: [delta_h1.u_gradient of the row's J, with group gradients, when
                           the row changes J's coefficients] + UpdateRule.delta_theta + the jackknife through
                           the row's rule (leave_one_group_out), δH₁' = X̄·Δθ')                 / t(plain U)
    u_gradient_configured = t(delta_h1.u_gradient of the configured J; what_if redoes it)        / t(plain U)
    entropy_gradient   = t(whatif.entropy_gradient, with group gradients)                         / t(plain U)
    beta_solve         = t(whatif.solve_entropy_coef: β* with X̄·Δθ(g + β h) = whatif.target)     / t(plain U)
    beta_solve_root    = the same for a target it reaches (halfway to X̄·Δθ(g + β₀ h), β₀ = ‖g‖/‖h‖)  / t(plain U)
    e_rows_K{1,4,10}   = t(whatif.e_rows_along, K directions stacked in one E backward)           / t(plain E)
    e_rows_per_extra_direction = [t(K=10) − t(K=1)] / 9                                           / t(plain E)
    what_if            = t(whatif.what_if, every default row; X̄ given)                  / t(plain E) + t(plain U)

"plain U" / "plain E" is bench.py's `plain_forward_backward` over U's / E's tokens alone (a trainer's step on them).
The directions of the stacked E pass are the configured update's Δθ, each default row's Δθ' and the entropy-neutral
one (10 with the default rows; without a β* one of them repeats). `--quick`: bench.py's quick batches at the default shape, and one row of each kind
(rule only: lr, clipping; new coefficients: loss aggregation, entropy bonus, token mask); `what_if` is then not timed
in the rounds (its one setup call's phases are reported).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    DTYPES,
    ROOT,
    adam_spec,
    add_common_arguments,
    build_model,
    environment,
    plain_forward_backward,
    run_config,
    sample_tensors,
    time_rounds,
    to_batches,
)
from entropy_probe.delta_h1 import Clock, e_coefficients, u_gradient  # noqa: E402
from entropy_probe.params import AdvantageParams, EstimatorParams, WhatIfParams  # noqa: E402
from entropy_probe.passes import entropy_pass  # noqa: E402
from entropy_probe.scoring import accumulation_dtype  # noqa: E402
from entropy_probe.specs import ComputeBudget  # noqa: E402
from entropy_probe.whatif import (  # noqa: E402
    Step,
    alternative,
    e_rows_along,
    entropy_gradient,
    solve_entropy_coef,
    token_pass,
    what_if,
)

K_DIRECTIONS = (1, 4, 10)
LIBRARY_FILES = ("whatif.py", "passes.py", "delta_h1.py", "loss_terms.py", "update_rule.py", "update.py", "tangents.py")
# --quick: one row of each kind (rule only: lr, clipping; new J coefficients: aggregation, entropy bonus, token mask)
QUICK_ROWS = (
    "half the learning rate",
    "clip at 0.1",
    "seq-mean-token-mean",
    "entropy bonus 0.01",
    "drop the top 5% cov tokens",
)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(
        ap,
        str(ROOT / "bench/results/whatif_bench.json"),
        "bench.py's smaller batches (default shape), one row of each kind, what_if not timed in the rounds",
    )
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def row_work(model, layout, alt, base_ug, xbar, budget, log: list):
    """One what-if row as `what_if` runs it, apart from its share of the stacked E pass: the row's U backward
    (when it changes J), Δθ' and the jackknife through its rule; appends its phases to `log`."""

    def run():
        clock, ug = Clock(), base_ug
        if alt.new_gradient:
            ug = clock("u_backward", u_gradient, model, layout, alt.U, alt.update, None, budget, Clock())
        step = clock("delta_theta", Step.of, alt.update, ug.g, ug.g_groups, alt.U, None)
        se_U = clock("jackknife", step.se_U, xbar)
        log.append(dict(clock))
        return float(xbar @ step.delta_theta), se_U

    return run


def logged(fn, log: list, phases=None):
    """fn(clock) with a fresh `Clock`, its phases (or `phases(output)`) appended to `log`."""

    def run():
        clock = Clock()
        out = fn(clock)
        log.append(dict(clock) if phases is None else phases(out))
        return out

    return run


def medians(log: list[dict]) -> dict:
    """Per phase, the median over the timed calls (log[0] is the warm-up)."""
    timed = log[1:] or log
    return {k: statistics.median(p.get(k, 0.0) for p in timed) for k in timed[0]}


def ratios(t: dict, rows: list[str]) -> dict:
    plain_U, plain_E = t["plain_U"], t["plain_E"]
    out = {
        "tokens": t["tokens"] / plain_U,
        "u_gradient_configured": t["u_gradient_configured"] / plain_U,
        "rows": {name: t[f"row: {name}"] / plain_U for name in rows},
        "entropy_gradient": t["entropy_gradient"] / plain_U,
        "beta_solve": t["beta_solve"] / plain_U,
        "beta_solve_root": t["beta_solve_root"] / plain_U,
        **{f"e_rows_K{k}": t[f"e_rows_K{k}"] / plain_E for k in K_DIRECTIONS},
        "e_rows_per_extra_direction": (t[f"e_rows_K{K_DIRECTIONS[-1]}"] - t[f"e_rows_K{K_DIRECTIONS[0]}"])
        / (K_DIRECTIONS[-1] - K_DIRECTIONS[0])
        / plain_E,
    }
    if "what_if" in t:
        out["what_if"] = t["what_if"] / (plain_E + plain_U)
    return out


def rounded(d):
    if isinstance(d, dict):
        return {k: rounded(v) for k, v in d.items()}
    return round(d, 4) if isinstance(d, float) else d


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = run_config(args)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    load_start = os.getloadavg()
    device, mt = args.device, cfg["max_tokens"]

    model = build_model(cfg, device, DTYPES[args.dtype], args.qlora)
    E_t, U_t, _, _ = sample_tensors(model, cfg, device, time_sampling=False)
    E, U = to_batches(E_t, U_t, cfg, device)
    layout, update = adam_spec(model)
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    dtype = accumulation_dtype(params[0])
    est = EstimatorParams(entropy=cfg["target"])
    spec = WhatIfParams()
    budget = ComputeBudget(mt)
    eps = AdvantageParams().eps
    rows = [r for r in spec.rows if not args.quick or r.name in QUICK_ROWS]

    # ------------------------------------------------------------------ setup (untimed): X̄, g, one what_if call
    setup = Clock()
    xbar = setup(
        "xbar", entropy_pass, model, params, layout, E, e_coefficients(E, est, est.entropy, None, dtype), None, mt
    )[0].double()
    base_ug = setup("u_gradient", u_gradient, model, layout, U, update, None, budget, Clock())
    g = base_ug.g.double()
    h, _ = setup("entropy_gradient", entropy_gradient, model, layout, U, update, None, budget, False)
    h = h.double()

    def run_what_if():
        return what_if(model, layout, E, U, update, spec.rows, est, xbar, spec, budget=budget, eps=eps, reuse=None)

    reference = setup("what_if", run_what_if)
    directions = [reference.base.delta_theta] + [r.delta_theta for r in reference.rows]
    if reference.neutral.at_solution is not None:
        directions.append(reference.neutral.at_solution.delta_theta)
    n_distinct = len(directions)
    while len(directions) < max(K_DIRECTIONS):  # no β*: repeat directions (a repeat costs what a new one does)
        directions.append(directions[len(directions) % n_distinct])
    by_name = {r.name: r for r in reference.rows}

    # ------------------------------------------------------------------ the timed callables
    logs: dict[str, list] = {}
    fns = {
        "plain_U": lambda: plain_forward_backward(model, [U], mt),
        "plain_E": lambda: plain_forward_backward(model, [E], mt),
        "tokens": logged(
            lambda clock: token_pass(model, layout, U, update, base_ug, xbar, budget, clock),
            logs.setdefault("tokens", []),
        ),
        "u_gradient_configured": lambda: u_gradient(model, layout, U, update, None, budget, Clock()),
    }
    alternatives = {r.name: alternative(update, r, U, eps) for r in rows}
    for name, alt in alternatives.items():
        fns[f"row: {name}"] = row_work(model, layout, alt, base_ug, xbar, budget, logs.setdefault(name, []))
    fns["entropy_gradient"] = lambda: entropy_gradient(
        model, layout, U, update, None, budget, base_ug.g_groups is not None
    )
    fns["beta_solve"] = lambda: solve_entropy_coef(update, g, h, xbar, spec.target)
    # a target with a root: halfway between δH₁ at β = 0 and at β₀ = ‖g‖/‖h‖ (a point of the solver's grid), so the
    # grid finds a sign change by β₀ and bisects
    beta_0 = float(g.norm() / h.norm())
    reachable = 0.5 * (reference.base.delta_h1 + float(xbar @ update.delta_theta(g + beta_0 * h)))
    fns["beta_solve_root"] = lambda: solve_entropy_coef(update, g, h, xbar, reachable)
    for k in K_DIRECTIONS:
        fns[f"e_rows_K{k}"] = lambda k=k: e_rows_along(model, layout, E, est, None, directions[:k], budget, Clock())
    if not args.quick:
        fns["what_if"] = logged(lambda clock: run_what_if(), logs.setdefault("what_if", []), lambda o: o.timings)

    keep = {"tokens", "beta_solve", "beta_solve_root", f"e_rows_K{max(K_DIRECTIONS)}"} | {
        f"row: {n}" for n in alternatives
    }
    times, outs = time_rounds(fns, cfg["repeats"], device, keep=keep)
    median_t = {k: statistics.median(v) for k, v in times.items()}
    names = list(alternatives)

    # ------------------------------------------------------------------ checks against the what_if call
    a, _, linear = outs["tokens"]
    psis = outs[f"e_rows_K{max(K_DIRECTIONS)}"]
    psis = psis[1] if isinstance(psis, tuple) else psis  # (X̄, ψs) in an earlier version of e_rows_along
    checks = {
        "rows_delta_h1_vs_what_if": max(rel_diff(outs[f"row: {n}"][0], by_name[n].delta_h1) for n in names),
        "rows_se_U_vs_what_if": max(rel_diff(outs[f"row: {n}"][1] or 0.0, by_name[n].se_U or 0.0) for n in names),
        # relative to Σ|a|: under binding clipping Δθ(g) is invariant to g's scale, so u·g = Σa = 0 (up to round-off)
        "tokens_sum_a_vs_u_dot_g": abs(float(a.double().sum()) - linear) / max(float(a.double().abs().sum()), 1e-300),
        "e_rows_mean_psi_vs_xbar_dot_delta": max(
            rel_diff(float(psi.double().mean()), float(xbar @ d.double())) for psi, d in zip(psis, directions)
        ),
    }
    beta = outs["beta_solve"]

    env = environment(device)
    env["load_average_start"] = load_start
    # the working tree's library at the time of the run (uncommitted work changes under a benchmark)
    env["library_sha256"] = {
        f: hashlib.sha256((ROOT / "entropy_probe" / f).read_bytes()).hexdigest()[:12] for f in LIBRARY_FILES
    }
    report = {
        "ratios": rounded(ratios(median_t, names)),
        "ratios_from_min_times": rounded(ratios({k: min(v) for k, v in times.items()}, names)),
        "times_s": rounded(median_t),
        "phases_s": rounded({k: medians(v) for k, v in logs.items()}),
        "rows": {n: {"changes": alternatives[n].changes, "new_gradient": alternatives[n].new_gradient} for n in names},
        "setup_s": rounded(dict(setup)),
        "what_if_setup_call_phases_s": rounded(reference.timings),
        "token_pass": {
            "u_dot_g": linear,
            "sum_a": float(a.double().sum()),
            "sum_abs_a": float(a.double().abs().sum()),
            "g_norm": float(g.norm()),
            "max_grad_norm": update.max_grad_norm,
        },
        "entropy_neutral": {
            "target": spec.target,
            "beta_star": beta,
            "reachable_target": reachable,
            "beta_star_of_reachable_target": outs["beta_solve_root"],
            "beta_0": beta_0,
            "delta_h1_configured": reference.base.delta_h1,
            "delta_h1_at_beta_0": float(xbar @ update.delta_theta(g + beta_0 * h)),
            "delta_h1_momentum_part": float(xbar @ update.momentum_part()),
            "directions_distinct": n_distinct,
            "u_group_gradients": base_ug.g_groups is not None,
        },
        "checks_max_rel_diff": checks,
        "config": dict(cfg, quick=args.quick),
        "tokens": {
            "E_sequences": len(E),
            "U_sequences": len(U),
            "columns": [E.input_ids.shape[1], U.input_ids.shape[1]],
            "E_response_tokens": int(E.mask.sum()),
            "U_response_tokens": int(U.mask.sum()),
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
        "env": env,
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps({k: report[k] for k in ("ratios", "times_s", "checks_max_rel_diff")}, indent=1))
    print(
        f"{env['device']}, {env['threads']} threads, {args.dtype}, load {load_start} → {env['load_average']}, "
        f"wall {report['wall_s']} s"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
