"""Tensor-list arguments that may be empty, declared ``Tensor[]?`` in the operators' schemas.

AOTInductor's proxy executor (torch 2.13 and 2.14) hands an extern kernel's empty ``Tensor[]``
argument over as None: it skips every list of length 0 when it fills the call's stack, whose
slots start as None. A ``Tensor[]`` schema then rejects the call, so an exported graph with an
attention site without extra tensors, or a norm without parameters, compiled but failed to run.
The forward operators that an exported inference graph holds therefore take these lists as
optional, and read None as the empty list; every caller in fxfuse passes a list."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor


def listed(tensors: Optional[Sequence[Tensor]]) -> list[Tensor]:
    """``tensors`` as a list, None (an empty list through AOTInductor) as []."""
    return [] if tensors is None else list(tensors)
