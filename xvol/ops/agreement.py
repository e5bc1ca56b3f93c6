"""How close two computations of one tensor are: the measure every backend check uses.

An absolute tolerance says nothing about a gradient of magnitude 1e-4 (an all-zero gradient is
within 1e-2 of it), so agreement is measured relative to the expected tensor's own size:

* ``rel_max``: max |got - expected| / max |expected| (the worst element against the scale);
* ``cosine``: the cosine of the angle between the two, flattened (direction; 0 for a zeroed
  tensor, negative for a flipped one).

Both are taken in float64. An expected tensor that is all zero has no scale; then only an exact
zero agrees. Used by ``dispatch``'s first-sight check of the Triton kernels and by the GPU tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Agreement", "agreement", "assert_agree"]


@dataclass(frozen=True)
class Agreement:
    rel_max: float
    cosine: float
    finite: bool

    def ok(self, rel_tol: float, min_cosine: float = 0.999) -> bool:
        return self.finite and self.rel_max <= rel_tol and self.cosine >= min_cosine

    def __str__(self) -> str:
        return f"max rel. error {self.rel_max:.3g}, cosine {self.cosine:.6f}"


def agreement(got: Tensor, expected: Tensor) -> Agreement:
    """See the module docstring. Shapes must match (a shape mismatch is a bug, not a tolerance)."""
    if got.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(got.shape)} vs {tuple(expected.shape)}")
    a = got.detach().double().flatten()
    b = expected.detach().double().flatten()
    finite = bool(torch.isfinite(a).all())
    if not finite or not torch.isfinite(b).all():
        return Agreement(float("inf"), float("nan"), False)
    scale = b.abs().max() if b.numel() else torch.zeros((), dtype=torch.float64)
    diff = (a - b).abs().max() if b.numel() else torch.zeros((), dtype=torch.float64)
    if scale == 0:
        exact = bool(diff == 0)
        return Agreement(0.0 if exact else float("inf"), 1.0 if exact else 0.0, True)
    norm = a.norm() * b.norm()
    cosine = float(a.dot(b) / norm) if norm > 0 else 0.0
    return Agreement(float(diff / scale), cosine, True)


def assert_agree(
    got: Tensor, expected: Tensor, rel_tol: float, min_cosine: float = 0.999, what: str = ""
) -> Agreement:
    """Raise AssertionError naming ``what`` unless ``got`` agrees with ``expected``."""
    result = agreement(got, expected)
    if not result.ok(rel_tol, min_cosine):
        raise AssertionError(
            f"{what or 'tensor'} disagrees: {result} (allowed: rel. error <= {rel_tol:g}, "
            f"cosine >= {min_cosine:g})"
        )
    return result
