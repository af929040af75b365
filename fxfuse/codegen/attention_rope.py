"""Rotary position embedding inside the attention kernels (a spec with ``rope_q``/``rope_k``).

q and k are rotated as they are loaded, ``x * cos + rotate(x) * sin`` with the rows of the cos and
sin tables for the tile's positions, so no rotated copy is ever written. ``rotate`` swaps the
halves of the head dim (``rotate_half``: cat(-x2, x1)) or the pairs (2j, 2j+1) ("interleaved",
complex multiplication) inside the tile: the tile holds the whole head dim (the kernels rotate
only when BLOCK_D == D, see ``fxfuse.ops.attention_rope.kernel_rotates``). Each product and the
sum are rounded to x's dtype, as the user's elementwise ops round them (a "/float32" style: computed
in float32 and rounded once, as Meta's complex RoPE on a 16-bit q does). The backward kernels load and rotate the same way, and
rotate the gradients of the rotated q and k back before they store them: the gradient of x is
``g * cos + rotate^T(g * sin)``, with rotate^T the transpose (inverse sign) of the swap.

The tables are read as (B, L, D) through strides (a table shared by the batch has stride 0 there).
A QK-norm (fxfuse.codegen.attention_qk_norm) normalises the loaded rows before they are rotated;
its parameters follow the tables among the kernels' arguments.
"""
from __future__ import annotations

from fxfuse.codegen.attention_qk_norm import norm_args, norm_strides, normalise
from fxfuse.spec_attention import AttentionSpec


def _rotated(spec: AttentionSpec) -> list[tuple[str, str]]:
    """(operand, style) per rotated operand, q before k."""
    return [(name, style) for name, style in (("q", spec.rope_q), ("k", spec.rope_k)) if style]


def rope_args(spec: AttentionSpec) -> str:
    return "".join(f"C{n.upper()}, S{n.upper()}, " for n, _ in _rotated(spec)) + norm_args(spec)


def rope_strides(spec: AttentionSpec) -> str:
    return "".join(f"s{t}{n}_b, s{t}{n}_l, s{t}{n}_d, " for n, _ in _rotated(spec) for t in "cs") + norm_strides(spec)


def helpers(spec: AttentionSpec) -> str:
    """The swap, rotation and inverse rotation functions every kernel of a RoPE spec calls."""
    if not _rotated(spec):
        return ""
    return '''

# RoPE: the head dim's halves (HALF) or pairs (2j, 2j+1) swapped inside a [ROWS, D] tile.
@triton.jit
def rope_swap(x, ROWS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    if HALF:
        a, b = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, D // 2]), (0, 2, 1)))
        y = tl.reshape(tl.permute(tl.join(b, a), (0, 2, 1)), [ROWS, D])
    else:
        a, b = tl.split(tl.reshape(x, [ROWS, D // 2, 2]))
        y = tl.reshape(tl.join(b, a), [ROWS, D])
    return y


@triton.jit
def rope_sign(offs_d, D: tl.constexpr, HALF: tl.constexpr):
    # rotate(x) = sign * swap(x): -x2 in the first half (-x_{2j+1} at even positions)
    if HALF:
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
    else:
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    return sign[None, :]


@triton.jit
def rope_rotate(x, c, s, offs_d, ROWS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, F32: tl.constexpr):
    # x * cos + rotate(x) * sin in x's dtype: each product and the sum rounded as the user's ops
    # round; F32: in float32 (float32 tables), rounded once to x's dtype at the end
    xf = x.to(tl.float32)
    r = rope_swap(xf, ROWS, D, HALF) * rope_sign(offs_d, D, HALF)
    if F32:
        return (xf * c.to(tl.float32) + r * s.to(tl.float32)).to(x.dtype)
    a = (xf * c.to(tl.float32)).to(x.dtype).to(tl.float32)
    b = (r * s.to(tl.float32)).to(x.dtype).to(tl.float32)
    return (a + b).to(x.dtype)


@triton.jit
def rope_unrotate(g, c, s, offs_d, ROWS: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    # the gradient of x from g, that of x * cos + rotate(x) * sin: g * cos + rotate^T(g * sin)
    return g * c.to(tl.float32) - rope_swap(g * s.to(tl.float32), ROWS, D, HALF) * rope_sign(offs_d, D, HALF)'''


def _tables(name: str, offs: str, bound: str, transposed: bool = False) -> list[str]:
    """Load the cos and sin rows of operand ``name`` at positions ``offs`` as [rows, BLOCK_D]."""
    lines = []
    for t in "cs":
        ptr = f"{t.upper()}{name.upper()} + off_b * s{t}{name}_b + {offs}[:, None] * s{t}{name}_l + offs_d[None, :] * s{t}{name}_d"
        lines.append(f"{t}{name} = tl.load({ptr}, mask=({offs}[:, None] < {bound}) & (offs_d[None, :] < D), other=0.0)")
    return lines


def _style(spec: AttentionSpec, name: str) -> str:
    """The HALF flag of the swap helpers."""
    return "True" if getattr(spec, f"rope_{name}").startswith("half") else "False"


def _rotation(spec: AttentionSpec, name: str) -> str:
    """The HALF and F32 flags of ``rope_rotate``."""
    return f"{_style(spec, name)}, {getattr(spec, f'rope_{name}').endswith('/float32')}"


def rotate_q(spec: AttentionSpec, var: str = "q") -> list[str]:
    """Normalise (QK-norm) and rotate the loaded [BLOCK_M, BLOCK_D] query tile ``var`` (rows
    offs_m), in q's dtype."""
    if not spec.rope_q:
        return normalise(spec, "q", var)
    return [*normalise(spec, "q", var), *_tables("q", "offs_m", "LQ"),
            f"{var} = rope_rotate({var}, cq, sq, offs_d, BLOCK_M, BLOCK_D, {_rotation(spec, 'q')})  # RoPE on the load"]


def rotate_kt(spec: AttentionSpec, var: str) -> list[str]:
    """Normalise (QK-norm) and rotate the loaded [BLOCK_D, BLOCK_N] transposed key tile ``var``
    (keys offs_n)."""
    if spec.norm_k:  # the norm's rows are the keys: normalise (and rotate) the [BLOCK_N, BLOCK_D] tile
        rope = [f"{var} = rope_rotate({var}, ck, sk, offs_d, BLOCK_N, BLOCK_D, {_rotation(spec, 'k')})  # RoPE on the load"]
        return [f"{var} = tl.trans({var})", *normalise(spec, "k", var),
                *([*_tables("k", "offs_n", "LK"), *rope] if spec.rope_k else []), f"{var} = tl.trans({var})"]
    if not spec.rope_k:
        return []
    return [*_tables("k", "offs_n", "LK"),
            f"{var} = tl.trans(rope_rotate(tl.trans({var}), ck, sk, offs_d, BLOCK_N, BLOCK_D, {_rotation(spec, 'k')}))"
            "  # RoPE on the load"]


def unrotate(spec: AttentionSpec, name: str, var: str) -> list[str]:
    """Turn ``var``, the float32 gradient of the rotated q (rows offs_m) or k (offs_n), into that of
    the unrotated operand, before it is stored."""
    if not getattr(spec, f"rope_{name}"):
        return []
    offs, bound, rows = ("offs_m", "LQ", "BLOCK_M") if name == "q" else ("offs_n", "LK", "BLOCK_N")
    return [*_tables(name, offs, bound),
            f"{var} = rope_unrotate({var}, c{name}, s{name}, offs_d, {rows}, BLOCK_D, {_style(spec, name)})"
            "  # back through RoPE"]
