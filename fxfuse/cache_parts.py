"""Hugging Face cache objects (DynamicCache, StaticCache, ...) taken apart into tensors and rebuilt.

transformers 5.x registers none of its cache classes as pytree nodes, so a model's output holding
``past_key_values`` (the default, ``use_cache=True``), or a cache passed in, could not be flattened
into the graph's tensors. Here a cache is replaced by a ``CacheParts``, a pytree node of fxfuse's
own (registering transformers' classes globally would change how other tools treat them): its
children are the cache's tensors, its context the classes and plain attributes of the cache and of
its layers, so two caches of the same structure give the same spec. ``rebuild`` makes a new cache
object of the same classes with the tensors of this call: the rewritten module returns what the
model returns, and a cache passed in is read (and written, for a static cache) through its tensors.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

_PLAIN = (bool, int, float, str, type(None), torch.device, torch.dtype, type)


def is_cache(x) -> bool:
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.") for c in type(x).__mro__)


def _split(obj, tensors: list, depth: int = 3):
    """``obj`` as a comparable context, appending its tensors; None when it holds something else."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor",)
    if isinstance(obj, _PLAIN):
        return ("value", obj)
    if depth == 0:
        return None
    if isinstance(obj, (list, tuple)):
        parts = [_split(x, tensors, depth - 1) for x in obj]
        return None if any(p is None for p in parts) else ("seq", type(obj), tuple(parts))
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers."):
        fields = [(name, _split(value, tensors, depth - 1)) for name, value in vars(obj).items()]
        return None if any(p is None for _, p in fields) else ("object", type(obj), tuple(fields))
    return None


def _join(ctx, tensors) -> Any:
    kind = ctx[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "value":
        return ctx[1]
    if kind == "seq":
        return ctx[1](_join(c, tensors) for c in ctx[2])
    obj = ctx[1].__new__(ctx[1])
    obj.__dict__.update({name: _join(c, tensors) for name, c in ctx[2]})
    return obj


class CacheParts:
    """A cache as its tensors (pytree children) and its structure (context)."""

    def __init__(self, context, tensors: list):
        self.context, self.tensors = context, list(tensors)

    @classmethod
    def of(cls, cache) -> "CacheParts | Any":
        tensors: list = []
        context = _split(cache, tensors)
        return cache if context is None else cls(context, tensors)

    def rebuild(self):
        return _join(self.context, iter(self.tensors))


pytree.register_pytree_node(CacheParts, lambda p: (p.tensors, p.context), lambda children, ctx: CacheParts(ctx, children))


def take_apart(tree):
    """``tree`` with every cache object replaced by its CacheParts (unchanged when it has none)."""
    if not any(is_cache(x) for x in pytree.tree_leaves(tree, is_leaf=is_cache)):
        return tree
    return pytree.tree_map(lambda x: CacheParts.of(x) if is_cache(x) else x, tree, is_leaf=is_cache)


def rebuild(tree):
    """The inverse of take_apart: a new cache object for every CacheParts."""
    parts = lambda x: isinstance(x, CacheParts)  # noqa: E731
    if not any(parts(x) for x in pytree.tree_leaves(tree, is_leaf=parts)):
        return tree
    return pytree.tree_map(lambda x: x.rebuild() if parts(x) else x, tree, is_leaf=parts)


def caches_in(tree) -> list:
    """The cache objects in ``tree``, in pytree order (the order ``take_apart`` visits them)."""
    return [x for x in pytree.tree_leaves(tree, is_leaf=is_cache) if is_cache(x)]


def _assign(passed, returned) -> None:
    """Give ``passed`` ``returned``'s state, keeping ``passed``'s own sub-objects (its layers) where
    they are of the same classes, so that references to them see the update too."""
    for name, value in vars(returned).items():
        old = passed.__dict__.get(name)
        if type(old) is type(value) and type(value).__module__.startswith("transformers.") \
                and hasattr(value, "__dict__"):
            _assign(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            kept = [a if type(a) is type(b) and hasattr(b, "__dict__") and type(b).__module__.startswith("transformers.")
                    and not _assign(a, b) else b for a, b in zip(old, value)]
            old[:] = kept + value[len(kept):]  # the same list object, as eager's appends keep it
        else:
            passed.__dict__[name] = value


def returned_in_place(out, passed: list, returned_is_passed: dict[int, int]):
    """``out`` with each returned cache that the model returned as the cache passed in (``returned
    ordinal -> passed ordinal``, recorded at capture) replaced by that passed-in object, updated in
    place to the returned state: what eager's in-place update and ``return past_key_values`` give."""
    if not returned_is_passed:
        return out
    seen = iter(range(1 << 30))

    def swap(x):
        if not is_cache(x):
            return x
        at = returned_is_passed.get(next(seen))
        if at is None:
            return x
        _assign(passed[at], x)
        return passed[at]

    return pytree.tree_map(swap, out, is_leaf=is_cache)
