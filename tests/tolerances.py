"""The one tolerance table. Results are compared by their distance to a float64 reference of the
same computation, so a low-precision result passes when it is about as close to the truth as the
eager result in that dtype is, not because a loose absolute tolerance hides errors."""
from __future__ import annotations

import torch

# (rtol, atol) by dtype and device, each with its reason. Reassociated sums use the same table:
# linear attention's A @ (B^T @ V) for (A @ B^T) @ V (non-negative features) measured within 1.03x
# eager's float32 error and 2x its bfloat16 error vs float64, L 256-4096 (docs/tolerances.md).
TOLERANCES = {
    # fp32 math reordered (a tree reduction in the kernel vs torch's): a few ulps on values of order 1.
    (torch.float32, "cpu"): (1e-5, 1e-5),
    # On GPU tl.rsqrt is an approximation within 2 ulp and tl.dot may use tf32.
    (torch.float32, "cuda"): (1e-4, 1e-4),
    # bf16 has 8 mantissa bits: one rounding is up to 2**-8 relative; a norm rounds 2-3 times.
    (torch.bfloat16, "cpu"): (2e-2, 2e-2),
    (torch.bfloat16, "cuda"): (2e-2, 2e-2),
    # fp16 has 11 mantissa bits.
    (torch.float16, "cpu"): (4e-3, 4e-3),
    (torch.float16, "cuda"): (4e-3, 4e-3),
    (torch.float64, "cpu"): (1e-10, 1e-10),
    (torch.float64, "cuda"): (1e-10, 1e-10),
}


def tolerance(dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    return TOLERANCES[(dtype, torch.device(device).type)]


def assert_close_to_reference(actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor, what: str = "") -> None:
    """``actual`` must be within the table's tolerance of the float64 ``reference``, and not much
    further from it than the eager result in the same dtype (2x its error, plus the tolerance)."""
    rtol, atol = tolerance(actual.dtype, actual.device.type)
    ref = reference.double().to(actual.device)
    err = (actual.double() - ref).abs()
    eager_err = (eager.double().to(actual.device) - ref).abs()
    bound = atol + rtol * ref.abs() + 2 * eager_err
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds bound (eager error {eager_err.max().item():.3g})"


def assert_close_as_a_whole(actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype,
                            what: str = "") -> None:
    """For a gradient that sums many products rounded to a 16-bit ``dtype`` whose sum cancels (a
    norm weight's over B*H*L rows, q's and k's through a norm that subtracts the gradient's share
    along the normalised row): a small element there carries the roundings of large terms, so the
    elementwise bound above is luck at test sizes, for eager as for fxfuse. The distance to the
    float64 ``reference`` over the whole tensor must be within 2x eager's plus the table's rtol of
    the reference's size (docs/tolerances.md)."""
    rtol, _ = tolerance(dtype, actual.device.type)
    ref = reference.double().to(actual.device)
    err, eager_err = (actual.double() - ref).norm().item(), (eager.double().to(actual.device) - ref).norm().item()
    assert err <= 2 * eager_err + rtol * ref.norm().item(), f"{what}: error {err:.3g} (whole tensor), eager's {eager_err:.3g}"


def assert_close_with_nonfinite(actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor,
                                what: str = "") -> None:
    """For inputs holding NaN or inf: ``actual`` is NaN exactly where ``eager`` is, +-inf where it
    is, and elsewhere within the table's bound of the float64 ``reference`` (see above)."""
    assert torch.equal(actual.isnan(), eager.isnan()), f"{what}: NaN at other positions than eager's"
    assert torch.equal(actual.isposinf(), eager.isposinf()) and torch.equal(actual.isneginf(), eager.isneginf()), \
        f"{what}: inf at other positions than eager's"
    finite = torch.isfinite(eager)
    assert_close_to_reference(actual[finite], eager[finite], reference.to(actual.device)[finite], what)
