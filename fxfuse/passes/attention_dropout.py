"""Dropout on attention probabilities, as training graphs hold it.

``F.dropout(p, rate)`` (and ``nn.Dropout``) reaches the captured graph in one of two forms, chosen
by the device at trace time:

- ``p * (bernoulli(empty_like(p), 1 - rate) / (1 - rate))``: the decomposition traced on CPU (and
  for any tensor the fused native kernel does not take);
- ``native_dropout(p, rate, True)[0]``: the native kernel on CUDA (its second output, the mask, is
  for the backward AOTAutograd derives).

Both are dropout exactly when the mask is one independent Bernoulli(1 - rate) draw per
probability (the draw has the probabilities' own shape), the rescale is 1 / (1 - rate) of that same
rate, nothing else reads the mask, and the rate is a constant in (0, 1). Anything else is not
fused: a broadcast mask (one draw shared by a row, a head, ...), another rescale, a mask reused
elsewhere or drawn from a generator of the user's; each says why.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fxfuse.passes.graph import dtype, is_op, is_python_scalar, is_random, plain_cast, shape

aten = torch.ops.aten


class NotDropout(Exception):
    """A random multiply of the probabilities that is not (provably) dropout; says why."""


@dataclasses.dataclass
class Dropout:
    rate: float
    out: Node  # the dropped probabilities
    nodes: list[Node]  # every node of the dropout (the random draw included), out first


def _rate(keep: float) -> float:
    # The traced constant is the keep probability 1 - rate (0.9 for 0.1); 1 - 0.9 is
    # 0.09999999999999998 in binary. Fifteen significant digits give back the rate as written,
    # and differ from the exact one by far less than any draw can resolve (2**-31 in the kernels).
    return float(f"{1.0 - keep:.15g}")


def _decline(why: str):
    raise NotDropout(why)


def dropout_of(p: Node, user: Node) -> Dropout | None:
    """The dropout ``user`` applies to the probabilities ``p``; None when ``user`` is not random.
    Raises NotDropout when ``user`` multiplies ``p`` by something random that is not dropout."""
    if is_op(user, aten.native_dropout.default) and user.args[0] is p:
        return _native(p, user)
    others = [a for a in user.args if a is not p] if is_op(user, aten.mul.Tensor) else []
    if len(others) != 1 or not drawn_nearby(others[0]):
        return None
    return _bernoulli(p, user, others[0])


def drawn_nearby(node, depth: int = 3) -> bool:
    """Whether ``node`` is a random draw, or one scaled or cast a few times (a dropout mask): not
    merely computed from something random far upstream (an activation after another dropout)."""
    for _ in range(depth + 1):
        if is_random(node):
            return True
        if not (plain_cast(node) or (is_op(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)
                                     and is_python_scalar(node.args[1]))):
            return False
        node = node.args[0]
    return False


def _check_shape(p: Node, mask: Node) -> None:
    if shape(mask) != shape(p):
        _decline(f"the probabilities are multiplied by a random mask of shape {list(shape(mask) or ())}, not their "
                 f"own {list(shape(p) or ())} (one draw shared by several probabilities, e.g. per head or per "
                 "row); fused attention drops each probability independently")


def _bernoulli(p: Node, mul: Node, noise: Node) -> Dropout:
    not_dropout = ("the probabilities are multiplied by a random tensor that is not dropout's rescaled mask "
                   "(bernoulli(1 - rate) / (1 - rate)); fused attention only applies dropout after the softmax")
    if not is_op(noise, aten.div.Scalar, aten.div.Tensor) or not is_python_scalar(noise.args[1]):
        _decline(not_dropout)
    draw = noise.args[0]
    keep = (draw.args[1] if len(draw.args) > 1 else draw.kwargs.get("p")) if is_op(draw, aten.bernoulli.p) else None
    if not is_python_scalar(keep):
        _decline(not_dropout)
    if draw.kwargs.get("generator") is not None:
        _decline("the dropout mask is drawn from a generator of the model's own; the fused operator draws "
                 "from its own seed")
    _check_shape(p, draw)
    keep = float(keep)
    if not 0.0 < keep < 1.0:
        _decline(f"dropout keeps each probability with probability {keep:g}; fused attention takes a rate in (0, 1)")
    if float(noise.args[1]) != keep:
        _decline(f"the dropout mask drawn with probability {keep:g} is divided by {float(noise.args[1]):g}, not "
                 f"by {keep:g}: that is not dropout's rescale 1 / (1 - rate)")
    if shape(mul) != shape(p) or dtype(mul) != dtype(p) or dtype(noise) != dtype(p):
        _decline(f"dropout changes the probabilities' dtype from {dtype(p)} to {dtype(mul)}; not fused")
    for node, users in ((draw, {noise}), (noise, {mul})):
        if set(node.users) != users:
            other = next(iter(set(node.users) - users))
            _decline(f"the dropout mask ({node.name}) is also used by {other.name}; fusing would drop that use")
    base = draw.args[0]  # only its shape and dtype matter; empty_like(p) reads p's metadata alone
    shaped = [base] if is_op(base, aten.empty_like.default) and base.args[0] is p and set(base.users) == {draw} else []
    return Dropout(_rate(keep), mul, [mul, noise, draw, *shaped])


def metadata_only(p: Node, user: Node) -> bool:
    """``empty_like(p)``: reads p's shape and dtype, not its values (dropout's draw starts from one)."""
    return is_op(user, aten.empty_like.default) and user.args[0] is p


def _native(p: Node, call: Node) -> Dropout:
    rate, train = call.args[1], call.args[2] if len(call.args) > 2 else call.kwargs.get("train")
    if not is_python_scalar(rate) or not 0.0 < float(rate) < 1.0 or train is not True:
        _decline(f"native_dropout(rate={rate}, train={train}) on the probabilities; fused attention takes "
                 "training dropout with a constant rate in (0, 1)")
    outs = {}
    for user in call.users:
        if user.target is not operator.getitem:
            _decline("native_dropout's result is used as a whole; not fused")
        outs[user.args[1]] = user
    if 1 in outs and outs[1].users:
        _decline(f"the dropout mask ({outs[1].name}) is used by {next(iter(outs[1].users)).name}; fusing would "
                 "drop that use")
    if 0 not in outs:
        return None
    return Dropout(float(rate), outs[0], [outs[0], *([outs[1]] if 1 in outs else []), call])

