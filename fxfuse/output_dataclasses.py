"""Dataclass outputs: opened for pytree without registering the user's type (see ``_OpenDataclass``)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch.utils._pytree as pytree


class _OpenDataclass:
    """A dataclass the model returns, opened for pytree without registering the user's type
    globally: its ``__init__`` fields are flattened, and unflattening calls the class with them, as
    the model's forward did (so ``__post_init__`` computes the other fields from this call's values)."""

    __slots__ = ("cls", "names", "values")

    def __init__(self, obj):
        self.cls = type(obj)
        self.names = [f.name for f in dataclasses.fields(obj) if f.init]
        self.values = [open_dataclasses(getattr(obj, name)) for name in self.names]


def _rebuild_dataclass(values, context):
    cls, names = context
    return cls(**dict(zip(names, values)))


pytree.register_pytree_node(
    _OpenDataclass, lambda d: (d.values, (d.cls, d.names)), _rebuild_dataclass,
    flatten_with_keys_fn=lambda d: ([(pytree.GetAttrKey(n), v) for n, v in zip(d.names, d.values)], (d.cls, d.names)))


def open_dataclasses(tree: Any) -> Any:
    """``tree`` with every dataclass instance pytree does not know opened (see ``_OpenDataclass``)."""
    def leaf(obj):
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and type(obj) not in pytree.SUPPORTED_NODES:
            return _OpenDataclass(obj)
        return obj

    return pytree.tree_map(leaf, tree)
