"""``torch.ops.fxfuse.gated_act``: the activation product of a gated MLP, ``act(gate) * up``,
whose backward recomputes ``act(gate)`` instead of keeping it.

Eager autograd keeps three tensors of the MLP's intermediate size for this product: the gate (for
the activation's backward), ``act(gate)`` and ``up`` (for the product's). This operator keeps
gate and up only, and recomputes the activation in backward: one tensor of (tokens, intermediate)
less per layer, for one more elementwise pass. Forward and backward run the very ATen ops eager
runs (silu, gelu, silu_backward, gelu_backward, sigmoid_backward), so results are bitwise eager's.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from fxfuse.spec_mlp import GatedActSpec

aten = torch.ops.aten


@functools.lru_cache(maxsize=64)
def _spec(text: str) -> GatedActSpec:
    return GatedActSpec.from_json(text)


def activation(act: str, gate: Tensor) -> Tensor:
    if act == "silu":
        return aten.silu(gate)
    if act == "silu_by_sigmoid":
        return gate * torch.sigmoid(gate)
    return aten.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")


def activation_backward(act: str, grad: Tensor, gate: Tensor) -> Tensor:
    if act == "silu":
        return aten.silu_backward(grad, gate)
    if act == "silu_by_sigmoid":  # d(g * s(g)) = grad * s + sigmoid_backward(grad * g, s), as autograd sums it
        s = torch.sigmoid(gate)
        return grad * s + aten.sigmoid_backward(grad * gate, s)
    return aten.gelu_backward(grad, gate, approximate="tanh" if act == "gelu_tanh" else "none")


@torch.library.custom_op("fxfuse::gated_act", mutates_args=())
def gated_act(gate: Tensor, up: Tensor, spec: str) -> Tensor:
    return (activation(_spec(spec).act, gate) * up).contiguous()


@gated_act.register_fake
def _(gate, up, spec):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fxfuse::gated_act_backward", mutates_args=())
def gated_act_backward(grad: Tensor, gate: Tensor, up: Tensor, spec: str) -> list[Tensor]:
    """[d_gate, d_up]."""
    act = _spec(spec).act
    d_up = grad * activation(act, gate)
    d_gate = activation_backward(act, grad * up, gate)
    return [d_gate.contiguous(), d_up.contiguous()]


@gated_act_backward.register_fake
def _(grad, gate, up, spec):
    return [gate.new_empty(gate.shape), up.new_empty(up.shape)]


def _setup(ctx, inputs, output):
    gate, up, spec = inputs
    ctx.save_for_backward(gate, up)
    ctx.spec = spec


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    d_gate, d_up = torch.ops.fxfuse.gated_act_backward(grad, gate, up, ctx.spec)
    return d_gate, d_up, None


gated_act.register_autograd(_backward, setup_context=_setup)
