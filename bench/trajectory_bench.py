"""The trajectory stage's per-step cost as ratios to a plain training step (results: bench/README.md).

    python bench/trajectory_bench.py --shape qwen2.5-0.5b --layers 1 [--draws 16] [--b-obs 64] \
        [--obs-new-tokens 32] [--repeats 1] [--warmup] --out bench/results/trajectory_cpu_qwen05b.json

The same random Qwen2 + LoRA, random-id E and U batches and synthetic AdamW state as `bench.py --shape …`
(its helpers are imported, not copied). One observed step of the trajectory stage, on the same E and U:

    plain            = a trainer's step: plain fwd+bwd over U's tokens (`plain_forward_backward([U])`)
    forecast         = compute_delta_h1(E, U) (U's per-group gradients cached) + K trainer draws
                       (resample_groups → simulate_trainer_draws with taylor = second_order.taylor_rows,
                       fd_eps 0.01; with --exact-draws < K simulate_trainer_draws_shared: one shared finite
                       difference around the mean step and that many own ones) + summarise: what `Probe.forecast` runs, without its δH₂ along the pool's
                       own Δθ (`with_second_order=True`), which is not timed here
    sampled_observed = observed_entropy.sampled_delta_h along Δθ = the forecast's est.delta_theta: two
                       teacher-forcing passes over an E batch of B_obs prompts and two fresh draws
                       (FreshSampling) of those prompts, at θ and θ + Δθ
    obs_e_draw       = drawing that E batch at θ (`generate_responses`, B_obs prompts): the trajectory's
                       `sample_e(B_obs)` before `sampled_delta_h`, reported apart

Ratios: forecast / plain, per draw (mean draw time / plain), compute_delta_h1 / plain,
sampled_observed / plain, (sampled_observed + obs_e_draw) / plain. Also against a plain step over E and U
(`plain_fwd_bwd_EU`, bench.py's "plain"). The expensive calls are timed once each by default (no warm-up:
a warm-up of the plain step and one short generate only); `--warmup` warms every one up first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # noqa: E402
    DTYPES,
    ROOT,
    SHAPES,
    adam_spec,
    build_model,
    build_tokenizer,
    device_name,
    plain_forward_backward,
    random_prompts,
    random_token_tensors,
    score_token_stats,
    time_rounds,
    to_batches,
)
from entropy_probe.delta_h1 import compute_delta_h1  # noqa: E402
from entropy_probe.forecast import (  # noqa: E402
    resample_groups,
    simulate_trainer_draws,
    simulate_trainer_draws_shared,
    summarise,
)
from entropy_probe.generation import GenerationSpec, generate_responses  # noqa: E402
from entropy_probe.ground_truth import FreshSampling  # noqa: E402
from entropy_probe.observed_entropy import sampled_delta_h  # noqa: E402
from entropy_probe.params import EstimatorParams  # noqa: E402
from entropy_probe.scoring import Batch  # noqa: E402
from entropy_probe.second_order import shifted_estimates, taylor_rows  # noqa: E402
from entropy_probe.specs import ComputeBudget  # noqa: E402

FD_EPS = 0.01
MIN_ESS_FRACTION = 0.3  # reuse.min_ess_fraction's default


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=None, help="keep fewer decoder layers")
    ap.add_argument("--draws", type=int, default=16, help="K simulated trainer draws")
    ap.add_argument(
        "--exact-draws", type=int, default=None,
        help="draws with their own δH₂ finite difference, the rest shared (trajectory.exact_draws); default: all K",
    )  # fmt: skip
    ap.add_argument("--trainer-groups", type=int, default=1, help="B_T: prompt groups per trainer draw (< B_U)")
    ap.add_argument("--b-obs", type=int, default=64, help="B_obs prompts of the sampled ΔH_obs")
    ap.add_argument("--obs-new-tokens", type=int, default=32, help="max new tokens of the sampled ΔH_obs draws")
    ap.add_argument("--gen-batch-size", type=int, default=None, help="generate batch size (default B_obs)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds (median)")
    ap.add_argument("--warmup", action="store_true", help="warm every timed call up first (doubles the run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/trajectory_cpu_qwen05b.json"))
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    cfg = dict(SHAPES[args.shape], temperature=args.temperature, top_p=args.top_p)
    cfg["layers"] = args.layers or cfg["layers"]
    device, max_tokens = args.device, cfg["max_tokens"]
    if not args.trainer_groups < cfg["B_U"]:
        raise SystemExit(f"--trainer-groups must be < B_U = {cfg['B_U']}")

    model = build_model(cfg, device, DTYPES[args.dtype], False)
    tok = build_tokenizer(cfg["vocab"])
    E_t = score_token_stats(model, random_token_tensors(cfg, cfg["B_E"], 1, seed=1), cfg, device)
    U_t = score_token_stats(model, random_token_tensors(cfg, cfg["B_U"], cfg["G"], seed=2), cfg, device)
    E, U = to_batches(E_t, U_t, cfg, device)
    layout, spec = adam_spec(model)
    est_params = EstimatorParams()
    budget = ComputeBudget(max_tokens)

    # the sampled ΔH_obs: B_obs prompts, an E batch drawn at θ, fresh draws of the same prompts (CRN seed)
    T, top_p, R_obs = cfg["temperature"], cfg["top_p"], args.obs_new_tokens
    prompts = random_prompts(cfg, args.b_obs, seed=3)
    gen_bs = args.gen_batch_size or args.b_obs
    e_spec = GenerationSpec(T, top_p, R_obs, gen_bs, seed=31)
    fresh = FreshSampling(tok, prompts, GenerationSpec(T, top_p, R_obs, gen_bs, seed=32))

    state: dict = {}
    draw_times: list[float] = []
    phases: list[dict] = []

    def plain():
        plain_forward_backward(model, [U], max_tokens)

    def plain_EU():
        plain_forward_backward(model, [E, U], max_tokens)

    def forecast():
        t0 = time.perf_counter()
        est = compute_delta_h1(model, E, U, layout, spec, est_params, budget)
        t_h1 = time.perf_counter() - t0
        if est.u_group_gradients is None:
            raise RuntimeError("compute_delta_h1 kept no per-group U gradients: the forecast cannot run")
        n_pool = est.u_group_gradients.shape[0]
        times = []

        def taylor(delta):
            start = time.perf_counter()
            first, second, _ = taylor_rows(model, E, layout, delta, est_params, FD_EPS, max_tokens)
            times.append(time.perf_counter() - start)
            return first, second

        def shifted(mean_delta, deltas):
            start = time.perf_counter()
            points = shifted_estimates(
                model, E, layout, mean_delta, est_params, max_tokens, (0.0, FD_EPS, -FD_EPS), None, False, deltas
            )
            state["shared_s"] = time.perf_counter() - start
            return points[FD_EPS].influence, points[-FD_EPS].influence, FD_EPS

        draws = resample_groups(n_pool, args.trainer_groups, args.draws, seed=0)
        groups, shares = est.u_group_gradients, est.u_group_denominators
        if args.exact_draws is None or args.exact_draws >= args.draws:
            sim = simulate_trainer_draws(spec, groups, shares, draws, taylor)
        else:
            sim = simulate_trainer_draws_shared(spec, groups, shares, draws, shifted, taylor, args.exact_draws)
        f = summarise(sim, n_pool, args.trainer_groups)
        draw_times.extend(times)
        phases.append({"compute_delta_h1": t_h1, "draws_taylor": sum(times), **est.timings})
        state.update(est=est, forecast=f, n_pool=n_pool)
        return f

    def obs_e_draw():
        state["obs_E_t"] = generate_responses(model, tok, prompts, e_spec, progress=False)
        return state["obs_E_t"]

    def sampled_observed():
        E_obs = Batch.from_tensors(
            dict(state["obs_E_t"], prompt_index=torch.arange(args.b_obs)), T, top_p, torch.device(device)
        )
        delta = {n: t.float() for n, t in layout.unflatten(state["est"].delta_theta).items()}
        r = sampled_delta_h(
            model,
            E_obs,
            delta,
            fresh,
            target=est_params.entropy,
            max_tokens=max_tokens,
            min_ess_fraction=MIN_ESS_FRACTION,
        )
        state["sampled"] = r
        return r

    # warm-up: the cheap calls always (allocator, first-call overheads), the expensive ones with --warmup
    fns = {
        "plain": plain,
        "plain_fwd_bwd_EU": plain_EU,
        "forecast": forecast,
        "obs_e_draw": obs_e_draw,
        "sampled_observed": sampled_observed,
    }
    if args.warmup:
        times, _ = time_rounds(fns, args.repeats, device)
        draw_times[:] = draw_times[args.draws :]  # the warm-up's draws
        phases[:] = phases[1:]
    else:
        time_rounds({"plain": plain}, 0, device)  # one warm-up call
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
                print(f"{k}: {times[k][-1]:.1f} s", flush=True)

    t = {k: statistics.median(v) for k, v in times.items()}
    per_draw = statistics.median(draw_times)
    h1 = statistics.median(p["compute_delta_h1"] for p in phases)
    obs_E_t = state["obs_E_t"]
    gen_e = int(obs_E_t["response_lens"].sum())
    sampled = state["sampled"]
    ratios = {
        "forecast": t["forecast"] / t["plain"],
        "forecast_per_draw": per_draw / t["plain"],
        "forecast_compute_delta_h1": h1 / t["plain"],
        "sampled_observed": t["sampled_observed"] / t["plain"],
        "sampled_observed_with_e_draw": (t["sampled_observed"] + t["obs_e_draw"]) / t["plain"],
        "obs_e_draw": t["obs_e_draw"] / t["plain"],
        "step_total": (t["forecast"] + t["sampled_observed"] + t["obs_e_draw"]) / t["plain"],
        "forecast_vs_plain_EU": t["forecast"] / t["plain_fwd_bwd_EU"],
        "forecast_per_draw_vs_plain_EU": per_draw / t["plain_fwd_bwd_EU"],
        "sampled_observed_vs_plain_EU": t["sampled_observed"] / t["plain_fwd_bwd_EU"],
    }
    f, est = state["forecast"], state["est"]
    rounded = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    report = {
        "ratios": rounded(ratios),
        "times_s": rounded(t),
        "times_all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "forecast_phases_s": rounded({k: statistics.median(p[k] for p in phases) for k in phases[0]}),
        "draw_times_s": [round(x, 3) for x in draw_times],
        "per_draw_s": round(per_draw, 3),
        "shared_difference_s": round(state.get("shared_s", 0.0), 3),  # the two stacked passes around Δθ̄
        "config": {
            **cfg,
            "draws_K": args.draws,
            "exact_draws": args.draws if args.exact_draws is None else min(args.exact_draws, args.draws),
            "trainer_groups_B_T": args.trainer_groups,
            "pool_groups": state["n_pool"],
            "B_obs": args.b_obs,
            "obs_new_tokens": R_obs,
            "gen_batch_size": gen_bs,
            "fd_eps": FD_EPS,
            "estimator": est_params.entropy,
            "repeats": args.repeats,
            "warmup_all": args.warmup,
        },
        "tokens": {
            "E_response_tokens": int(E.mask.sum()),
            "U_response_tokens": int(U.mask.sum()),
            "columns": [E.input_ids.shape[1], U.input_ids.shape[1]],
            "obs_E_generated_tokens": gen_e,
            # sampled_delta_h draws B_obs responses at θ and at θ + Δθ (≤ obs_new_tokens each)
            "sampled_observed_generated_tokens_max": 2 * args.b_obs * R_obs,
            "sampled_observed_teacher_forced_tokens": 2 * gen_e,
        },
        "results": {
            "delta_h1": est.delta_h1,
            "forecast_delta_h": f.delta_h,
            "forecast_se": f.se,
            "forecast_sd_trainer": f.sd_trainer,
            "sampled_delta_h_obs": sampled.delta_h,
            "sampled_se": sampled.se,
            "sampled_method": sampled.method,
            "snis_ess_fraction": sampled.snis_ess_fraction,
        },
        "model": {
            "shape": args.shape,
            "layers": cfg["layers"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": layout.numel,
            "dtype": args.dtype,
            "attn_implementation": "eager",
        },
        "env": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": device_name(device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average": os.getloadavg(),
        },
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print(json.dumps({k: report[k] for k in ("ratios", "times_s", "forecast_phases_s", "tokens", "results")}))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} (wall {report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main()
