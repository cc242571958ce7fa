"""Test helpers shared by the kernel tests."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def assert_fast_within_torch_error(fast: torch.Tensor, torch_same: torch.Tensor, ref64: torch.Tensor,
                                   factor: float = 2.0, floor: float = 1e-6,
                                   torch_probe: torch.Tensor | None = None) -> None:
    """flash-attention rule: the fast path's error against a float64 reference is at most
    `factor` x the error of PyTorch in the same dtype (plus a tiny floor for exact cases).

    torch_probe: PyTorch in the same dtype on inputs moved by one rounding. On ill-conditioned draws
    (a BN over a few values with a large invstd) PyTorch's error is itself a matter of luck, ~1e-7 on
    one draw and ~1e-5 one ulp away; the bound then takes the larger of the two errors."""
    ref = ref64.to(torch.float64)
    err_fast = (fast.to(torch.float64) - ref).abs().max().item()
    err_torch = (torch_same.to(torch.float64) - ref).abs().max().item()
    if torch_probe is not None:
        err_torch = max(err_torch, (torch_probe.to(torch.float64) - ref).abs().max().item())
    scale = max(1.0, ref.abs().max().item())
    assert err_fast <= factor * err_torch + floor * scale, (
        f"fast-path error {err_fast:.3e} > {factor} x torch error {err_torch:.3e} (+ floor {floor * scale:.1e})")


def assert_layout_follows_input(y: torch.Tensor, x: torch.Tensor, channels_last: bool) -> None:
    """A fused op's output is channels_last exactly when its input was (and the layout is not ambiguous)."""
    if channels_last and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    else:
        assert y.is_contiguous()


def assert_bitwise_same_across_threads(run: Callable[[], Sequence[torch.Tensor]],
                                       threads: Sequence[int] = (1, 2, 1)) -> None:
    """run() (an op's outputs and gradients) gives bit-identical tensors at each of these intra-op thread counts
    (the count is restored afterwards)."""
    outs = []
    old = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            outs.append(tuple(run()))
    finally:
        torch.set_num_threads(old)
    for other in outs[1:]:
        assert len(other) == len(outs[0])
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def keep_two_bns_off_relu6_kinks(ins: Sequence[torch.Tensor], channels: int, beta_b_top: float) -> None:
    """For gradcheck of a two-BN add merge whose inputs are (_, gamma_a, beta_a, _, gamma_b, beta_b, ...): betas
    spread over [1, 2] and [1, beta_b_top], gammas scaled by 0.2, so that the summed pre-activations stay off the
    ReLU6 kinks (0 and 6), where the gradient is undefined."""
    with torch.no_grad():
        ins[2].copy_(torch.linspace(1.0, 2.0, channels, dtype=ins[2].dtype))
        ins[5].copy_(torch.linspace(1.0, beta_b_top, channels, dtype=ins[5].dtype))
        ins[1].mul_(0.2)
        ins[4].mul_(0.2)
