"""Entropy-gradient estimators: brute-force coefficients, baseline independence, and z-tests of
unbiasedness and of the delta-method SE against exact ∇H of a tabular toy policy."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tolerances import FP64_REL, assert_close_scaled, dot_scale, sum_scale
from toy_policy import ToyPolicy

from entropy_probe.errors import ProbeError
from entropy_probe.estimators import BASELINES, TARGETS, entropy_coefficients, naive_coefficients

N_DIRS = 3


@pytest.fixture(scope="module")
def toy():
    policy = ToyPolicy(seed=0)
    gen = torch.Generator().manual_seed(123)
    dirs = torch.randn(N_DIRS, *policy.theta.shape, generator=gen, dtype=torch.float64)
    exact = {t: torch.stack([(policy.exact_gradient(t) * v).sum() for v in dirs]) for t in TARGETS}
    return policy, dirs, exact


def _sample(policy, dirs, n, seed, theta=None):
    """A batch from π_θ (or from `theta`), with the directional derivatives under π_θ along each direction."""
    gen = torch.Generator().manual_seed(seed)
    batch = policy.sample(n, gen, theta=theta)
    batch = policy.batch(batch.tokens, batch.mask)  # H, logp under θ
    derivs = [policy.directional(batch.tokens, batch.mask, v) for v in dirs]
    return batch, derivs


def _features(batch, rows=slice(None)):
    return {"top1_prob": batch.top1_prob[rows], "margin": batch.margin[rows]}


def _coefs(batch, rows, target, baseline, **kw):
    return entropy_coefficients(
        batch.entropies[rows].detach(),
        batch.mask[rows],
        target=target,
        baseline=baseline,
        features=_features(batch, rows),
        **kw,
    )


def _estimates(coefs, derivs, rows):
    """[(X̄·v, SE)] for every direction."""
    return [coefs.estimate(d_h[rows], d_lp[rows]) for d_h, d_lp in derivs]


# ---------------------------------------------------------------------------------------------------
# Exact values against brute force (explicit loops)


def _random_case(seed, n=6, r=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, r + 1, (n,), generator=gen)
    lengths[0] = r  # some sequence reaches the last column
    mask = torch.arange(r)[None, :] < lengths[:, None]
    ent = torch.rand(n, r, generator=gen, dtype=torch.float64) * 2 * mask
    return ent, mask


def _brute_returns(ent, mask, target):
    """Per (i, j) the return(s) the score at j multiplies, by loops. token_mean: (R^S, R^L)."""
    n, r = mask.shape
    out = {}
    for i in range(n):
        L = int(mask[i].sum())
        S = sum(float(ent[i, k]) for k in range(L))
        for j in range(L):
            if target == "sequence":
                out[i, j] = (sum(float(ent[i, k]) for k in range(j + 1, L)),)
            elif target == "token_mean":
                out[i, j] = (sum(float(ent[i, k]) for k in range(j + 1, L)), float(L - j - 1))
            else:
                out[i, j] = (S / L,)
    return out


def _brute_coefficients(ent, mask, target, baseline):
    """a, c by explicit loops over sequences and positions, straight from the formulas."""
    n, r = mask.shape
    rets = _brute_returns(ent, mask, target)
    lens = [int(mask[i].sum()) for i in range(n)]
    sums = [sum(float(ent[i, k]) for k in range(lens[i])) for i in range(n)]
    a = torch.zeros(n, r, dtype=torch.float64)
    c = torch.zeros(n, r, dtype=torch.float64)
    for i in range(n):
        others = [o for o in range(n) if o != i]
        h_loo = sum(sums[o] for o in others) / sum(lens[o] for o in others)
        l_loo = sum(lens[o] for o in others) / len(others)
        for j in range(lens[i]):
            ret = rets[i, j]
            if baseline == "mean":
                peers = [rets[o, j] for o in others if (o, j) in rets]
                base = tuple(sum(p[t] for p in peers) / len(peers) if peers else 0.0 for t in range(len(ret)))
            else:
                base = (0.0,) * len(ret)
            if target == "sequence":
                a[i, j], c[i, j] = 1.0, ret[0] - base[0]
            elif target == "token_mean":
                a[i, j] = 1 / l_loo
                c[i, j] = ((ret[0] - base[0]) - h_loo * (ret[1] - base[1])) / l_loo
            else:
                a[i, j], c[i, j] = 1 / lens[i], ret[0] - base[0]
    return a, c


@pytest.mark.parametrize("target,baseline", list(itertools.product(TARGETS, ["none", "mean"])))
def test_coefficients_match_brute_force(target, baseline):
    for seed in range(3):
        ent, mask = _random_case(seed)
        coefs = entropy_coefficients(ent, mask, target=target, baseline=baseline)
        a, c = _brute_coefficients(ent, mask, target, baseline)
        torch.testing.assert_close(coefs.a.double(), a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(coefs.c.double(), c, rtol=1e-12, atol=1e-12)
        lens = mask.sum(-1).double()
        expected = {
            "sequence": ent.sum(-1).mean(),
            "token_mean": ent.sum() / lens.sum(),
            "seq_mean_token_mean": (ent.sum(-1) / lens).mean(),
        }[target]
        assert coefs.entropy == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_regression_baseline_ignores_the_padding_width(target):
    """The baseline is a function of the other sequences and of i's own prefix only: an extra all-padding
    column (as when some other artifact's longest response is longer) changes no coefficient.
    Position features scaled by the artifact's width R failed this (R can be sequence i's own length)."""
    ent, mask = _random_case(3, n=12, r=4)
    gen = torch.Generator().manual_seed(4)
    feats = {"top1_prob": torch.rand(12, 4, generator=gen, dtype=torch.float64)}
    kw = dict(target=target, baseline="regression", ridge=0.5, folds=3)
    narrow = entropy_coefficients(ent, mask, features=feats, **kw)
    pad = lambda x: torch.nn.functional.pad(x, (0, 1))  # noqa: E731
    wide = entropy_coefficients(pad(ent), pad(mask), features={k: pad(v) for k, v in feats.items()}, **kw)
    torch.testing.assert_close(wide.c[:, :4], narrow.c, rtol=0, atol=1e-12)
    assert (wide.c[:, 4] == 0).all()


@pytest.mark.parametrize("target", TARGETS)
def test_regression_baseline_matches_per_fold_least_squares(target):
    """Cross-fitted ridge vs an independent solver: per fold, least squares on the other folds'
    rows augmented with √λ·I rows for the penalised (non-intercept) coefficients."""
    ent, mask = _random_case(7, n=13, r=4)
    gen = torch.Generator().manual_seed(8)
    feats = {
        "top1_prob": torch.rand(13, 4, generator=gen, dtype=torch.float64),
        "margin": torch.rand(13, 4, generator=gen, dtype=torch.float64),
    }
    ridge, folds = 0.7, 4
    got = entropy_coefficients(
        ent, mask, target=target, baseline="regression", features=feats, ridge=ridge, folds=folds
    )
    none = entropy_coefficients(ent, mask, target=target, baseline="none")
    rets = _brute_returns(ent, mask, target)
    n, r = mask.shape
    rows = sorted(rets)
    x = {
        (i, j): [float(ent[i, j]), float(feats["margin"][i, j]), float(feats["top1_prob"][i, j]), math.log1p(j), 1.0]
        for i, j in rows
    }
    baseline = {}
    for k in range(folds):
        train = [key for key in rows if key[0] % folds != k]
        design = torch.tensor([x[key] for key in train], dtype=torch.float64)
        aug = torch.cat([design, math.sqrt(ridge) * torch.eye(5, dtype=torch.float64)[:4]])
        for t in range(len(rets[rows[0]])):
            y = torch.tensor([rets[key][t] for key in train] + [0.0] * 4, dtype=torch.float64)
            beta = torch.linalg.lstsq(aug, y[:, None]).solution[:, 0]
            for key in rows:
                if key[0] % folds == k:
                    baseline.setdefault(key, [0.0, 0.0])[t] = float(torch.tensor(x[key], dtype=torch.float64) @ beta)
    h_loo_l_loo = None
    if target == "token_mean":  # c = (R^S − b^S − Ĥ₋ᵢ (R^L − b^L)) / L̄₋ᵢ; recover Ĥ₋ᵢ, L̄₋ᵢ from a
        lens = mask.sum(-1).double()
        sums = ent.sum(-1)
        h_loo_l_loo = ((sums.sum() - sums) / (lens.sum() - lens), (lens.sum() - lens) / (n - 1))
    for i, j in rows:
        b = baseline[i, j]
        if target == "token_mean":
            h_loo, l_loo = h_loo_l_loo[0][i], h_loo_l_loo[1][i]
            expected = none.c[i, j] - (b[0] - h_loo * b[1]) / l_loo
        else:
            expected = none.c[i, j] - b[0]
        assert got.c[i, j].item() == pytest.approx(expected.item(), abs=1e-10)


def test_regression_features_as_mapping_or_stacked_tensor_agree():
    ent, mask = _random_case(5, n=11, r=4)
    gen = torch.Generator().manual_seed(6)
    top1, margin = (torch.rand(11, 4, generator=gen, dtype=torch.float32) for _ in range(2))
    kw = dict(target="token_mean", baseline="regression")
    as_dict = entropy_coefficients(ent, mask, features={"top1_prob": top1, "margin": margin}, **kw)
    as_tensor = entropy_coefficients(ent, mask, features=torch.stack([margin, top1], -1), **kw)
    torch.testing.assert_close(as_dict.c, as_tensor.c, rtol=0, atol=0)
    only_h = entropy_coefficients(ent, mask, **kw)
    assert not torch.allclose(only_h.c, as_dict.c)  # the extra features are used
    with pytest.raises(ValueError, match="features must be"):
        entropy_coefficients(ent, mask, features=top1[:5], **kw)


@pytest.mark.parametrize("target,baseline", list(itertools.product(TARGETS, BASELINES)))
def test_coefficients_of_a_sequence_ignore_its_own_data_except_its_returns(target, baseline):
    """Change the last entropy of sequence i: its baseline, Ĥ₋ᵢ and L̄₋ᵢ must not move, so c_ij changes by
    exactly the change of its own return (scaled by 1/L̄₋ᵢ for token_mean) and a_i not at all. The
    regression baseline may use sequence i's own prefix features (H_ij is one), so there only the
    positions before the bumped one are checked."""
    n, r = 9, 4
    ent, mask = _random_case(3, n=n, r=r)
    gen = torch.Generator().manual_seed(4)
    feats = {"top1_prob": torch.rand(n, r, generator=gen, dtype=torch.float64)}
    lens = mask.sum(-1)
    for i in range(n):
        bumped = ent.clone()
        bumped[i, lens[i] - 1] += 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
        kw = dict(target=target, baseline=baseline, features=feats, folds=3)
        old, new = entropy_coefficients(ent, mask, **kw), entropy_coefficients(bumped, mask, **kw)
        old0 = entropy_coefficients(ent, mask, target=target, baseline="none")
        new0 = entropy_coefficients(bumped, mask, target=target, baseline="none")
        cols = slice(0, lens[i] - 1) if baseline == "regression" else slice(None)
        assert lens[i] == 1 or (old.c[i, cols] != new.c[i, cols]).any()  # the bump does reach c
        torch.testing.assert_close(
            new.c[i, cols] - old.c[i, cols], new0.c[i, cols] - old0.c[i, cols], rtol=0, atol=1e-12
        )
        torch.testing.assert_close(new.a[i], old.a[i], rtol=0, atol=0)


def test_errors_are_one_line_probe_errors():
    ent, mask = _random_case(0)
    with pytest.raises(ProbeError, match="unknown entropy target 'tokens'"):
        entropy_coefficients(ent, mask, target="tokens", baseline="none")
    with pytest.raises(ProbeError, match="unknown baseline 'median'"):
        entropy_coefficients(ent, mask, target="sequence", baseline="median")
    with pytest.raises(ProbeError, match="at least 2 E sequences"):
        entropy_coefficients(ent[:1], mask[:1], target="token_mean", baseline="none")
    bad = ent.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ProbeError, match="non-finite entropies"):
        entropy_coefficients(bad, mask, target="sequence", baseline="mean")
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ProbeError, match="empty response"):
        entropy_coefficients(ent, empty, target="sequence", baseline="mean")


@pytest.mark.numerics
def test_uniform_weights_equal_default_and_xbar_by_autograd_matches_influence_mean(toy):
    """The orchestrator's path: X̄ = ∇ Σ_i w_i Σ_k (a H + c logp) by backward, dotted with v, equals
    mean(ψ) = Σ w s from forward-mode directional derivatives; uniform weights = no weights."""
    policy, dirs, _ = toy
    gen = torch.Generator().manual_seed(5)
    sample = policy.sample(50, gen)
    theta = policy.theta.clone().requires_grad_(True)
    batch = policy.batch(sample.tokens, sample.mask, theta)
    w = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    for target in TARGETS:
        kw = dict(target=target, baseline="regression", features=_features(batch))
        plain = entropy_coefficients(batch.entropies.detach(), batch.mask, **kw)
        uniform = entropy_coefficients(batch.entropies.detach(), batch.mask, weights=torch.full((50,), 0.02), **kw)
        torch.testing.assert_close(plain.c, uniform.c)
        weighted = entropy_coefficients(batch.entropies.detach(), batch.mask, weights=w, **kw)
        surrogate = (w[:, None] * (weighted.a * batch.entropies + weighted.c * batch.logprobs)).sum()
        (xbar,) = torch.autograd.grad(surrogate, theta, retain_graph=True)
        for v in dirs:
            d_h, d_lp = policy.directional(batch.tokens, batch.mask, v)
            psi = weighted.influence(d_h, d_lp)
            # float64 identities, relative to the magnitude of the summed terms (the sums may cancel)
            assert_close_scaled(psi.mean(), (xbar * v).sum(), dot_scale(xbar, v), FP64_REL, "mean ψ vs X̄·v")
            ws = w * weighted.scalars(d_h, d_lp)
            assert_close_scaled(ws.sum(), psi.mean(), sum_scale(ws), FP64_REL, "Σ w s vs mean ψ")


# ---------------------------------------------------------------------------------------------------
# Statistical tests against exact ∇H of the toy policy

SEEDS = range(6)
BIG_N = 4000


@pytest.fixture(scope="module")
def big_batches(toy):
    policy, dirs, _ = toy
    return [_sample(policy, dirs, BIG_N, 1000 + s) for s in SEEDS]


def test_toy_sampler_matches_enumeration(toy, big_batches):
    """The sampler draws from the enumerated distribution: per-sequence frequencies vs exact probabilities."""
    policy, _, _ = toy
    tokens, mask = policy.enumerate()
    _, logp, _, _ = policy.token_stats(policy.theta, tokens, mask)
    p = logp.sum(-1).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    drawn = torch.cat([b.tokens for b, _ in big_batches])
    counts = (drawn[:, None, :] == tokens[None]).all(-1).sum(0).double()
    assert counts.sum().item() == len(drawn)  # every draw is one enumerated sequence
    expected = p * len(drawn)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    dof = len(p) - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


@pytest.mark.parametrize("target,baseline", list(itertools.product(TARGETS, BASELINES)))
def test_unbiased_against_exact_gradient(toy, big_batches, target, baseline):
    """One batch of N = 4000 per seed: z = (X̄·v − ∇H·v) / SE_E, |z| < 4 for each seed and direction,
    and the mean z over seeds within 4 standard errors of 0 (directions may be correlated)."""
    _, _, exact = toy
    zs = torch.tensor(
        [
            [
                (est - exact[target][k].item()) / se
                for k, (est, se) in enumerate(
                    _estimates(_coefs(batch, slice(None), target, baseline), derivs, slice(None))
                )
            ]
            for batch, derivs in big_batches
        ]
    )
    print(f"\n{target}/{baseline} z-scores:\n{zs.numpy().round(2)}")
    assert zs.abs().max() < 4
    assert zs.mean(0).abs().max() < 4 / math.sqrt(len(SEEDS))


@pytest.mark.parametrize(
    "target,baseline", [(t, b) for t in ("sequence", "seq_mean_token_mean") for b in ("mean", "regression")]
)
def test_exactly_unbiased_at_tiny_batches(toy, target, baseline):
    """sequence / seq_mean_token_mean have no plug-in ratios, so they are unbiased at any N ≥ 2: with
    N = 4 a baseline that leaked its own sequence would be biased by ~1/4 of the score term."""
    policy, dirs, exact = toy
    n, m = 4, 1500
    batch, derivs = _sample(policy, dirs, n * m, 7)
    est = torch.tensor(
        [
            [
                e
                for e, _ in _estimates(
                    _coefs(batch, slice(b * n, (b + 1) * n), target, baseline, folds=4),
                    derivs,
                    slice(b * n, (b + 1) * n),
                )
            ]
            for b in range(m)
        ]
    )
    z = (est.mean(0) - exact[target]) / (est.std(0) / math.sqrt(m))
    print(f"\n{target}/{baseline} N=4 z: {z.numpy().round(2)}")
    assert z.abs().max() < 4


@pytest.mark.parametrize("target,baseline", [(t, "mean") for t in TARGETS] + [("token_mean", "regression")])
def test_standard_error_matches_spread_over_batches(toy, target, baseline):
    """SE_E = std(ψ)/√N (delta method) vs the empirical std of X̄·v over 600 independent batches of 32.
    For token_mean the plain std(s)/√N, which ignores the fluctuation of Ĥ and L̄, is visibly off."""
    policy, dirs, _ = toy
    n, m = 32, 600
    batch, derivs = _sample(policy, dirs, n * m, 11)
    res, plain = [], []
    for b in range(m):
        rows = slice(b * n, (b + 1) * n)
        coefs = _coefs(batch, rows, target, baseline)
        res.append(_estimates(coefs, derivs, rows))
        plain.append([coefs.scalars(dh[rows], dl[rows]).std().item() / math.sqrt(n) for dh, dl in derivs])
    res, plain = torch.tensor(res), torch.tensor(plain)  # [m, dirs, (est, se)], [m, dirs]
    spread = res[..., 0].std(0)
    ratio = res[..., 1].pow(2).mean(0).sqrt() / spread
    ratio_plain = plain.pow(2).mean(0).sqrt() / spread
    print(
        f"\n{target}/{baseline} SE / empirical spread: {ratio.numpy().round(3)} (plain std(s): "
        f"{ratio_plain.numpy().round(3)})"
    )
    # the std of a 600-sample std is ~3%: allow ±12%
    assert ((ratio > 0.88) & (ratio < 1.12)).all()
    if target == "token_mean":
        assert (ratio_plain - 1).abs().max() > 0.15


def _z(values, exact):
    """z of a pooled batch mean: values [m, dirs] of per-batch estimates."""
    return (values.mean(0) - exact) / (values.std(0) / math.sqrt(len(values)))


def test_biased_variants_are_detected(toy, big_batches):
    """The tests have power: three deliberately wrong estimators fail the same z-test, while the
    correct ones pass on the same samples."""
    policy, dirs, exact = toy
    batch = type(big_batches[0][0])(
        *[
            torch.cat([getattr(b, f) for b, _ in big_batches])
            for f in ("tokens", "mask", "entropies", "logprobs", "top1_prob", "margin")
        ]
    )
    derivs = [tuple(torch.cat([d[k][j] for _, d in big_batches]) for j in range(2)) for k in range(N_DIRS)]
    rows = slice(None)
    mask = batch.mask.double()
    ent = batch.entropies.detach()

    def pooled_z(a, c, target):
        s = torch.stack([(a * dh + c * dl).sum(-1) for dh, dl in derivs], 1)  # [N, dirs]
        return _z(s, exact[target])

    # 1) dropping the pathwise term Σ_k ∇H_k
    good = _coefs(batch, rows, "sequence", "mean")
    assert pooled_z(good.a, good.c, "sequence").abs().max() < 4
    z_no_path = pooled_z(torch.zeros_like(good.a), good.c, "sequence")
    # 2) seq_mean_token_mean with the causal reward-to-go Σ_{k>j} H_k / L instead of the whole f
    good = _coefs(batch, rows, "seq_mean_token_mean", "none")
    assert pooled_z(good.a, good.c, "seq_mean_token_mean").abs().max() < 4
    causal = entropy_coefficients(ent, batch.mask, target="sequence", baseline="none").c / mask.sum(-1, keepdim=True)
    z_causal = pooled_z(good.a, causal * mask, "seq_mean_token_mean")
    # 3) a per-position mean baseline that includes the sequence itself, in batches of 4
    n = 4
    none = _coefs(batch, rows, "sequence", "none")
    r = none.c.view(-1, n, mask.shape[1])
    mk = mask.view(-1, n, mask.shape[1])
    in_sample = ((r * mk).sum(1, keepdim=True) / mk.sum(1, keepdim=True).clamp(min=1) * mk).view_as(none.c)
    z_own = pooled_z(none.a, none.c - in_sample, "sequence")
    loo = torch.cat(
        [
            entropy_coefficients(ent[b : b + n], batch.mask[b : b + n], target="sequence", baseline="mean").c
            for b in range(0, len(ent), n)
        ]
    )
    assert pooled_z(none.a, loo, "sequence").abs().max() < 4
    print(
        f"\nbiased variants, max |z|: no pathwise {z_no_path.abs().max():.1f}, causal smtm "
        f"{z_causal.abs().max():.1f}, own-sequence baseline {z_own.abs().max():.1f}"
    )
    for z in (z_no_path, z_causal, z_own):
        assert z.abs().max() > 8


def test_importance_weighted_estimates_are_consistent(toy):
    """E drawn from a behaviour policy θ_b, self-normalised weights π_θ/π_θb: X̄·v still estimates ∇H(θ)·v."""
    policy, dirs, exact = toy
    gen = torch.Generator().manual_seed(21)
    theta_b = policy.theta + 0.4 * torch.randn(policy.theta.shape, generator=gen, dtype=torch.float64)
    zs = []
    for seed in range(4):
        batch, derivs = _sample(policy, dirs, BIG_N, 300 + seed, theta=theta_b)
        behaviour = policy.batch(batch.tokens, batch.mask, theta_b).logprobs.sum(-1)
        w = torch.softmax(batch.logprobs.detach().sum(-1) - behaviour, 0)
        for target in TARGETS:
            coefs = _coefs(batch, slice(None), target, "regression", weights=w)
            zs.append(
                [(e - exact[target][k].item()) / se for k, (e, se) in enumerate(_estimates(coefs, derivs, slice(None)))]
            )
    zs = torch.tensor(zs)
    print(f"\nimportance-weighted z-scores:\n{zs.numpy().round(2)}")
    assert zs.abs().max() < 4


@pytest.mark.parametrize("target", ["sequence", "token_mean"])
def test_naive_estimator_unbiased_but_noisier(toy, big_batches, target):
    _, _, exact = toy
    zs, ratios = [], []
    for batch, derivs in big_batches:
        naive = naive_coefficients(batch.logprobs.detach(), batch.mask, target=target)
        rb = _coefs(batch, slice(None), target, "mean")
        for k, (d_h, d_lp) in enumerate(derivs):
            e, se = naive.estimate(None, d_lp)
            zs.append((e - exact[target][k].item()) / se)
            ratios.append(se / rb.estimate(d_h, d_lp)[1])
    print(
        f"\nnaive {target}: z {torch.tensor(zs).numpy().round(2)}, SE naive/RB {torch.tensor(ratios).numpy().round(1)}"
    )
    assert max(abs(z) for z in zs) < 4
    assert min(ratios) > 1


def test_naive_seq_mean_token_mean_estimates_its_own_surprisal_functional(toy, big_batches):
    """The surprisal per token weighted by 1/L is not the entropy per token (y_k decides L), so the naive
    seq_mean_token_mean targets ∇E[−log π(y)/L] — exact by enumeration — not the RB target."""
    policy, dirs, _ = toy
    tokens, mask = policy.enumerate()
    theta = policy.theta.clone().requires_grad_(True)
    _, logp, _, _ = policy.token_stats(theta, tokens, mask)
    q = -logp.sum(-1)
    (grad,) = torch.autograd.grad((logp.sum(-1).exp() * q / mask.sum(-1)).sum(), theta)
    exact = torch.stack([(grad * v).sum() for v in dirs])
    zs = []
    for batch, derivs in big_batches:
        naive = naive_coefficients(batch.logprobs.detach(), batch.mask, target="seq_mean_token_mean")
        zs += [
            (naive.estimate(None, d_lp)[0] - exact[k].item()) / naive.estimate(None, d_lp)[1]
            for k, (_, d_lp) in enumerate(derivs)
        ]
    assert max(abs(z) for z in zs) < 4
