"""bitsandbytes optimizer state (AdamW8bit / paged, the Trainer's adamw_bnb_8bit / paged_adamw_8bit): the moments
are bitsandbytes' own dequantisation of its 8-bit blockwise codes (or its 32-bit state for small tensors), and the
emulated AdamW step from them is bitsandbytes' real next step to the float32 rounding of θ."""

from __future__ import annotations

import pytest
import torch

from entropy_probe.errors import ProbeError
from entropy_probe.optimizer_state import dequantised_bnb_state
from entropy_probe.update import adam_step_delta

bnb = pytest.importorskip("bitsandbytes")
LR, WD = 1e-3, 0.1


@pytest.fixture()
def stepped():
    """An 8-bit (8192 elements: 32 blocks of 256) and a 32-bit (10 elements) parameter after 3 AdamW8bit steps."""
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(4096, 2)), torch.nn.Parameter(torch.randn(10))
    optimizer = bnb.optim.AdamW8bit([big, small], lr=LR, weight_decay=WD)
    for _ in range(3):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        optimizer.step()
    return optimizer, (big, small)


def test_the_moments_are_bitsandbytes_own_dequantisation(stepped):
    optimizer, (big, small) = stepped
    saved = optimizer.state_dict()["state"]
    q = saved[0]["__bnb_optimizer_quant_state__"]
    assert q["state1"].dtype == torch.uint8 and q["absmax1"].numel() == 32
    state = dequantised_bnb_state(saved[0], "big")
    for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
        ref = torch.ops.bitsandbytes.dequantize_blockwise(
            q[f"state{i}"], q[f"absmax{i}"], q[f"qmap{i}"], 256, torch.float32
        )
        assert torch.equal(state[key], ref)
    assert state["step"] == 3 and bool((state["exp_avg_sq"] >= 0).all())
    small_state = dequantised_bnb_state(saved[1], "small")  # under min_8bit_size: a 32-bit state
    assert torch.equal(small_state["exp_avg"], saved[1]["__bnb_optimizer_quant_state__"]["state1"])


def test_the_emulated_step_is_bitsandbytes_next_step(stepped):
    """Δθ = torch AdamW's step from the dequantised moments (`update.adam_step_delta`) against the step AdamW8bit
    takes with the same gradient: within 4 float32 ulps of each max(|θ|, |θ'|) (bitsandbytes updates θ in float32 in place)."""
    optimizer, params = stepped
    saved = optimizer.state_dict()["state"]
    before = [(p.detach().double().clone(), dequantised_bnb_state(saved[i], str(i))) for i, p in enumerate(params)]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer.step()
    for p, g, (theta, st) in zip(params, grads, before):
        m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
        # g = ∇J = −(the loss gradient the optimizer sees); no clipping here
        emulated = adam_step_delta(-g.double(), theta, m, v, float(st["step"]), LR, 0.9, 0.999, 1e-8, WD, None)
        real = p.detach().double() - theta
        # the stored θ' = θ + Δθ is rounded to float32: the unit of its last place, where θ or θ' is larger
        ulp = torch.finfo(torch.float32).eps * torch.maximum(theta.abs(), (theta + real).abs())
        assert float(((emulated - real).abs() / ulp).max()) < 4
        assert float((emulated - real).norm()) < 1e-3 * float(real.norm())


def test_other_bitsandbytes_states_are_refused(stepped):
    optimizer, _ = stepped
    saved = optimizer.state_dict()["state"][0]
    q = dict(saved["__bnb_optimizer_quant_state__"])
    del q["absmax1"]
    with pytest.raises(ProbeError, match="non-blockwise 8-bit .* does not model — train with torch AdamW or"):
        dequantised_bnb_state({"step": 3, "__bnb_optimizer_quant_state__": q}, "p")
    from entropy_probe.optimizer_state import _dequantise_bnb

    with pytest.raises(ProbeError, match="AdEMAMix, not AdamW"):
        _dequantise_bnb({0: saved}, [{"lr": LR, "alpha": 5.0, "params": [0]}])
