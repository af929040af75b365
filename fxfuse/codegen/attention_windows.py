"""Window addressing for the attention kernels of a spec with ``windows`` (Swin, see
fxfuse.ops.attention_windows): q, k, v, dO and the output are image tensors, and the kernels read
row ``t`` of window ``off_b`` (the scores' batch index, b * nW + wy * nWx + wx) from its image
position instead of a (B * nW, H, N, D) copy. Every other index (the extras, the row statistics,
index expressions, tile lists) stays the window batch's, as without windows.

The window kernels are the plain kernels' source with each operand's ``off_b * stride_xb +
offs * stride_xm`` (batch and row) replaced by ``window_row(off_b, offs, stride_xb, stride_xm)``:
the launcher passes an image tensor's batch stride and its pixel stride (its rows uniformly
strided: stride(1) == Wp * stride(2)), and dq, dk, dv are stored in (B, Hp, Wp, H, D) image order.
The substitution is checked: no batch-and-row address of an operand is left as it was.
"""
from __future__ import annotations

import re

from fxfuse.spec_attention import AttentionSpec

_OPERAND_ROW = re.compile(r"off_b \* (stride_[a-z]+b) \+ (off_h(?:kv)? \* stride_[a-z]+h) \+ "
                          r"(offs_[mn]\[[^\]]*\]) \* (stride_[a-z]+)")
_GRAD_STORE = re.compile(r"tl\.store\((DQ|DK|DV_OUT) \+ rows \* (DV?) \+ ")


def _helper(spec: AttentionSpec) -> str:
    ws, shift, hp, wp = spec.windows
    nwx = wp // ws
    nw = (hp // ws) * nwx
    return f'''


# Swin's windows read in place: token t of window w (b * {nw} + wy * {nwx} + wx) of the {hp}x{wp} image
# rolled by -{shift} is image pixel ((wy * {ws} + t // {ws} + {shift}) % {hp}, (wx * {ws} + t % {ws} + {shift}) % {wp}).
@triton.jit
def window_row(off_b, t, stride_b, stride_pixel):
    w = off_b % {nw}
    y = ((w // {nwx}) * {ws} + t // {ws} + {shift}) % {hp}
    x = ((w % {nwx}) * {ws} + t % {ws} + {shift}) % {wp}
    return (off_b // {nw}) * stride_b + (y * {wp} + x) * stride_pixel'''


def address_windows(source: str, spec: AttentionSpec) -> str:
    """The kernels' ``source`` reading and writing image tensors (see the module's docstring)."""
    hp, wp = spec.windows[2:]
    source, loads = _OPERAND_ROW.subn(r"window_row(off_b, \3, \1, \4) + \2", source)

    def grad(m: re.Match) -> str:
        buf, width = m.group(1), m.group(2)
        offs = "offs_m" if buf == "DQ" else "offs_n"
        return f"tl.store({buf} + window_row(off_b, {offs}[:, None], {hp * wp} * H * {width}, H * {width}) + off_h * {width} + "

    source, stores = _GRAD_STORE.subn(grad, source)
    if loads == 0 or "off_b * stride_" in source or "rows * D" in source:
        raise AssertionError("fxfuse: the attention templates changed; window addressing must be updated with them")
    head = "import triton.language as tl"
    return source.replace(head, head + _helper(spec), 1)
