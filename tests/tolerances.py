"""The test suite's precision policy: how two floating-point results are compared, in one place.

1. Exact identities (two ways of computing one quantity: hooks vs double backward vs autograd of the
   naive loss, one microbatch vs many, X̄·v vs the mean of the influence values) run in float64 and
   are compared with FP64_REL. Rounding is then ~1e-16 of the size of the terms, whatever the kernels.

2. float32 results (the production dtype) never get a bare rtol on a result that may cancel. The
   rounding of a float32 sum Σ tᵢ grows with Σ|tᵢ|, not with |Σ tᵢ|, and the kernels that do the sum
   (AVX512, AVX2 or the default path, MKL's code path, the CPU vendor) decide its exact value: X̄·v =
   0.1364 made of terms with Σ|X̄ᵢvᵢ| = 179 carries an error of ~4e-5, i.e. 3e-4 of the result but
   2e-7 of the terms. So the tolerance is FP32_REL × the magnitude of what was summed:
     - a dot product x·v:               scale = Σ|xᵢvᵢ|               (`dot_scale`)
     - a sum or mean of terms tᵢ:       scale = Σ|tᵢ| (or its mean)    (`sum_scale`)
     - a vector compared as a whole:    ‖actual − expected‖ ≤ FP32_REL ‖expected‖  (`assert_vectors_close`)
   Elementwise rtol is not used on float32 vectors: an element that is itself a cancelling sum
   (a gradient entry near 0) carries the rounding of its terms, which its own size does not show.

Tests that compare floating-point results whose rounding depends on the CPU kernels carry the
`numerics` marker, so CI can re-run them on another kernel path:
    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE pytest -m numerics tests/
"""

from __future__ import annotations

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2⁻²³ ≈ 1.19e-7
# ~80 ε: rounding in the forward, the backward (and double backward) and the summation order, relative
# to the magnitude of the summed terms. Measured worst case on the suite: ~6e-7 (5 ε).
FP32_REL = 1e-5
# float64 identities: ~5000 ε₆₄ (measured ≤ 2e-16 of the scale on a tiny transformer, double backward included).
FP64_REL = 1e-12


def _f64(x) -> torch.Tensor:
    """x as a float64 CPU tensor (Python floats too: torch.as_tensor alone would round them to float32)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def dot_scale(x, v) -> float:
    """Σᵢ |xᵢ vᵢ| (in float64): the magnitude of the terms of the dot product x·v."""
    return float((_f64(x).reshape(-1) * _f64(v).reshape(-1)).abs().sum())


def sum_scale(*terms) -> float:
    """Σ |t| over every element of every tensor given: the magnitude of the terms of their sum."""
    return float(sum(_f64(t).abs().sum() for t in terms))


def assert_close_scaled(actual, expected, scale: float, rel: float = FP32_REL, what: str = "") -> None:
    """|actual − expected| ≤ rel · scale, where scale is the magnitude of the summed terms (not of the result).

    For tensors the difference is measured as a whole, ‖actual − expected‖₂.
    """
    diff = float((_f64(actual) - _f64(expected)).norm())
    assert scale > 0, f"{what}: zero scale; compare with the magnitude of the summed terms"
    assert diff <= rel * scale, (
        f"{what}: |{_show(actual)} − {_show(expected)}| = {diff:.3g} > {rel:g} × scale {scale:.4g} "
        f"({diff / scale:.2g} of the scale)"
    )


def assert_vectors_close(actual, expected, rel: float = FP32_REL, what: str = "") -> None:
    """‖actual − expected‖₂ ≤ rel · ‖expected‖₂: a float32 vector compared as a whole (see the module doc)."""
    assert _f64(actual).shape == _f64(expected).shape, (
        f"{what}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}"
    )
    assert_close_scaled(actual, expected, float(_f64(expected).norm()), rel, what)


def _show(x) -> str:
    t = _f64(x)
    return f"{float(t):.8g}" if t.numel() == 1 else f"tensor{tuple(t.shape)}"
