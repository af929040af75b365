"""QK-norm in ``fxfuse.attention_rope``: q and/or k normalised over the head dim before the product.

A spec's ``norm_q``/``norm_k`` hold the NormSpec of a norm over each row (the head dim D) of q
(k): the operator takes the *unnormalised* operand, normalises it (then rotates it, with RoPE) and
attends. The norm's parameters (weight, bias, each of D elements) follow the cos/sin tables in the
operator's ``tables``: [cos_q, sin_q]? [cos_k, sin_k]? [q's norm params]? [k's norm params]?.

The norm is computed exactly as ``fxfuse.norm`` computes the same spec (its dtypes and roundings
are the user's, proved by the fuse-norm pass); on the Triton path the kernels normalise the rows
they load (``fxfuse.codegen.attention_qk_norm``), and the backward takes the gradient of the
normalised operand from the attention kernels and the norm's own backward
(``fxfuse.norm_backward``) for the raw operand's and the parameters' gradients.
"""
from __future__ import annotations

from torch import Tensor

from fxfuse.lowering.norm import lower_norm
from fxfuse.ops import norm as norm_op
from fxfuse.spec import NormSpec, to_dtype
from fxfuse.spec_attention import AttentionSpec

OPERANDS = ("q", "k")


def norm_specs(spec: AttentionSpec) -> dict[str, NormSpec]:
    """{"q"|"k": NormSpec} of the normalised operands."""
    return {n: norm_op._spec(text) for n, text in (("q", spec.norm_q), ("k", spec.norm_k)) if text}


def split_tables(spec: AttentionSpec, tables: list[Tensor]) -> tuple[dict, dict]:
    """({operand: (cos, sin)}, {operand: [norm params]}) from the operator's ``tables``."""
    rotated = [n for n, style in (("q", spec.rope_q), ("k", spec.rope_k)) if style]
    norms = norm_specs(spec)
    want = 2 * len(rotated) + sum(len(ns.params) for ns in norms.values())
    if len(tables) != want:
        raise ValueError(f"fxfuse.attention_rope: {len(tables)} tables given, the spec needs {want}: pass (cos, sin) "
                         f"for each rotated operand ({rotated or 'none'}), q's first, then the norm parameters of "
                         f"each normalised operand ({list(norms) or 'none'})")
    rope = {n: (tables[2 * i], tables[2 * i + 1]) for i, n in enumerate(rotated)}
    params, at = {}, 2 * len(rotated)
    for n, ns in norms.items():
        params[n] = list(tables[at:at + len(ns.params)])
        at += len(ns.params)
    return rope, params


def normalised(spec: AttentionSpec, q: Tensor, k: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    """q and k after their norms, in torch ops (differentiable: the CPU direct call and Inductor's
    form let autograd take the gradient as it did of the user's norm)."""
    for name, ns in norm_specs(spec).items():
        if name == "q":
            q = norm_op.cpu_norm(ns, q, params["q"])
        else:
            k = norm_op.cpu_norm(ns, k, params["k"])
    return q, k


def kernel_normalises(spec: AttentionSpec, q: Tensor, k: Tensor) -> bool:
    """Whether the attention kernels can normalise the rows they load for this spec: each norm a
    mean-of-squares form accumulated in float32 (not F.normalize's max_l2, not float64) whose output
    keeps its input's dtype (the kernels round the normalised tile to the operand's dtype)."""
    for name, ns in norm_specs(spec).items():
        x = q if name == "q" else k
        plan = lower_norm(ns)
        if plan.acc != "float32" or plan.inverse != "rsqrt" or ns.residual or to_dtype(ns.out_dtype) != x.dtype:
            return False
    return True


def through_norm(ns: NormSpec, x: Tensor, grad: Tensor, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(d x, [d params]) from ``grad``, the gradient of the normalised x."""
    d_x, *d_params = norm_op.norm_backward(grad.to(to_dtype(ns.out_dtype)), None, x, params, ns.to_json())
    return d_x.to(x.dtype), d_params
