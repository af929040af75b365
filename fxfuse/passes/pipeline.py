"""The pass pipeline: small named passes over the captured ATen graph, run in a fixed order.

A pass is a frozen dataclass with a kebab-case ``name`` and its options as fields; calling it on a
GraphModule rewrites the graph in place and returns a ``PassResult`` saying what it changed and what
it declined, with reasons. Nothing is counted in globals. A pipeline is a list of passes or a
string such as ``"canonicalize,fuse-norm"``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch


@dataclasses.dataclass(frozen=True)
class Match:
    """A site that was rewritten into one fused operator."""

    kind: str  # "rms_norm", "layer_norm", "attention", ...
    source: str  # the user's file:line, or "<unknown>"
    spec: Any  # the spec dataclass (fxfuse.spec)
    node: str  # name of the fused node in the rewritten graph
    code: str = ""  # the user's source line, when known
    notes: tuple[str, ...] = ()  # what was left as written inside the site, and why
    shape: str = ""  # the sizes the site was captured at, in words ("B 2, H 8, GQA 8→2, ...")

    def describe(self) -> str:
        return self.spec.describe() if hasattr(self.spec, "describe") else str(self.spec)


@dataclasses.dataclass(frozen=True)
class Miss:
    """A candidate site that was left as written, with a reason the user can act on."""

    kind: str
    source: str
    reason: str
    code: str = ""
    shapes: bool = False  # declined because of the sizes (the torch.compile backend warns about these)


@dataclasses.dataclass
class PassResult:
    name: str
    matches: list[Match] = dataclasses.field(default_factory=list)
    misses: list[Miss] = dataclasses.field(default_factory=list)
    changed: int = 0  # how many nodes were rewritten (canonicalisation) or sites fused


class Pass(Protocol):
    name: str

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult: ...


def available_passes() -> dict[str, type]:
    # Imported here, not at module import, so that no pass module registers itself by being imported.
    from fxfuse.passes.canonicalize import Canonicalize
    from fxfuse.passes.attention import FuseAttention
    from fxfuse.passes.attention_rope import FuseRope
    from fxfuse.passes.attention_differential import FuseDifferential
    from fxfuse.passes.attention_differential_pairs import FuseDifferentialPairs
    from fxfuse.passes.attention_qk_norm import FuseQkNorm
    from fxfuse.passes.norm import FuseNorm
    from fxfuse.passes.sdpa import ClaimSDPA
    from fxfuse.passes.linear_cross_entropy import FuseLinearCrossEntropy
    from fxfuse.passes.gated_mlp import FuseGatedMLP
    from fxfuse.passes.dyt import FuseDyT
    from fxfuse.passes.polynorm import FusePolyNorm
    from fxfuse.passes.linear_attention import FuseLinearAttention
    from fxfuse.passes.attention_windows import AddressWindows

    passes = (Canonicalize, ClaimSDPA, FuseDifferentialPairs, FuseAttention, FuseDifferential, FuseRope, FusePolyNorm,
              FuseNorm, FuseQkNorm, FuseLinearCrossEntropy, FuseGatedMLP, FuseDyT, FuseLinearAttention,
              AddressWindows)
    return {cls.name: cls for cls in passes}


DEFAULT_PIPELINE = "canonicalize,claim-sdpa,fuse-differential-pairs,fuse-attention,fuse-differential,fuse-rope,fuse-polynorm,fuse-norm,fuse-qk-norm,address-windows"


def parse_pipeline(spec: str | list | tuple | None) -> list:
    """``None`` → the default pipeline; a string → passes by name; a list → names or pass objects."""
    if spec is None:
        spec = DEFAULT_PIPELINE
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    known = available_passes()
    passes = []
    for item in items:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(f"unknown fxfuse pass {item!r}; the passes are: {', '.join(known)}")
            passes.append(known[item]())
        elif callable(item) and hasattr(item, "name"):
            passes.append(item)
        else:
            raise TypeError(f"a pipeline entry must be a pass name or a pass object, got {item!r}")
    return passes


def run_pipeline(gm: torch.fx.GraphModule, passes) -> list[PassResult]:
    results = []
    for p in parse_pipeline(passes):
        result = p(gm)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        results.append(result)
    gm.recompile()
    return results
