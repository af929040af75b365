"""Linear attention kernels: Triton source generated from a LinearAttentionSpec (launched by
``fxfuse.runtime.linear_attention``).

The operator's inputs are ``a`` (N, L, D) = phi(q), ``bt`` (N, D, S) = phi(k)^T, ``v`` (N, S, E)
(a column of ones for the normaliser): the features as the graph computed them, or q and k^T
themselves when the spec names an elementwise feature map for a side (``phi_a`` / ``phi_b``),
which the kernels then apply to each tile as it is loaded (the backward's d_a and d_bt are the
features' gradients; the operator chains them through phi', or a softmax's Jacobian). A softmax
over the features is row-local (all of D is one tile); k's softmax over the sequence takes a
first walk over the keys for each feature's max and sum (``_key_stats``). One program
per (batch, block of E columns) walks the sequence in chunks of BLOCK_C rows holding a (D, E)
float32 state in registers:

- non-causal: the state is ``bt @ v`` summed over every chunk, then each chunk of queries reads
  it (``out = a @ state``);
- causal: chunk by chunk, ``out = a @ state + tril(a @ bt) @ v`` with the state of the chunks
  before, then ``state += bt @ v`` -- the (L, L) matrix exists only as one (C, C) block at a time.

The backward recomputes from the inputs (nothing else is saved): ``backward_da`` walks forward
carrying the same state (``d_a = g @ state^T + tril(g @ v^T) @ bt^T``), ``backward_dbdv`` walks
backward carrying ``sum over later chunks of a^T @ g`` (``d_v = bt^T @ dstate + tril(a @ bt)^T @
g``, ``d_b = v @ dstate^T + tril(g @ v^T)^T @ a``). ``d_a`` and ``d_b`` sum over E, so each E
block writes a float32 partial that the runtime adds; ``d_v`` is exact per block.

Products of two input tiles (``a @ bt``, ``bt @ v``, ``g @ v^T``, ``a^T @ g``) take the inputs as
they are (16-bit tiles on tensor cores, exact products, float32 sums); products with a float32
state or block take it unrounded, the input tile widened to float32, at ``PREC`` (the runtime
passes ``tf32x3`` on a GPU: three tf32 products, float32-accurate; ``ieee`` in the interpreter).
Rounding the state to 16 bits instead (as flash attention rounds its probabilities) measured up to
2x eager's bf16 error on d_a and d_b: the gradients sum that rounding over every column. So the
kernels compute what the torch path computes (everything in float32, one rounding at the end), in
another order. ``DOT_F32`` (the interpreter, which multiplies 16-bit tiles wrongly) widens every
tile to float32 as it is loaded.
"""
from __future__ import annotations

from fxfuse.codegen.kernel import Kernel, kernel_name
from fxfuse.spec_linear_attention import LinearAttentionSpec

FUNCTIONS = ("forward", "backward_da", "backward_dbdv")

_PRELUDE = '''    n = tl.program_id(0).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
'''


# phi of a float32 tile ``x``, for the feature maps the operator applies (spec.phi_a / phi_b):
# elu(x) + 1 is x + 1 above 0 and exp(x) below (one exp, no cancellation in exp(x) - 1 + 1).
_PHI = {"elu1": "tl.where({x} > 0, {x} + 1.0, tl.exp({x}))", "relu": "tl.maximum({x}, 0.0)",
        "exp": "tl.exp({x})", "sigmoid": "1.0 / (1.0 + tl.exp(-{x}))", "square": "{x} * {x}"}


def _featured(name: str, phi: str, mask: str, ptr: str) -> list[str]:
    """The features of a loaded q or k tile: phi in float32, rounded once to the inputs' dtype (as
    the model's code rounds phi's output), and zero outside the mask (the padding must stay no
    feature at all: phi(0) is 1 for elu + 1, exp and sigmoid)."""
    if not phi:
        return []
    if phi == "softmax_features":  # every feature of a row (a) or column (bt) is in the tile: BLOCK_D >= D
        axis, keep = (1, "[:, None]") if name == "a" else (0, "[None, :]")
        features = "offs_d[None, :] < D" if name == "a" else "offs_d[:, None] < D"
        return [f'{name} = tl.where({features}, {name}.to(tl.float32), float("-inf"))',  # padded features weigh 0
                f"{name} = tl.exp({name} - tl.max({name}, axis={axis}){keep})",
                f"{name} = tl.where({mask}, {name} / tl.sum({name}, axis={axis}){keep}, 0.0).to({ptr}.dtype.element_ty)"]
    if phi == "softmax_keys":  # each feature over all the keys, from the statistics of _key_stats
        return [f"{name} = tl.where({mask}, tl.exp({name}.to(tl.float32) - m_k[:, None]) / l_k[:, None], 0.0)"
                f".to({ptr}.dtype.element_ty)"]
    return [f"{name} = {name}.to(tl.float32)",
            f"{name} = tl.where({mask}, {_PHI[phi].format(x=name)}, 0.0).to({ptr}.dtype.element_ty)"]


def _key_stats(spec: LinearAttentionSpec) -> list[str]:
    """For k's softmax over the sequence (spec.phi_b "softmax_keys", non-causal): a first walk over
    the keys computing each feature's max ``m_k`` and sum of exp(k - m_k) ``l_k`` (online, as
    flash attention's rows), so the later loads apply the softmax tile by tile. A (BLOCK_D,)
    vector pair per program: the softmaxed keys are never written."""
    if spec.phi_b != "softmax_keys":
        return []
    return ['m_k = tl.full([BLOCK_D], float("-inf"), tl.float32)',
            "l_k = tl.zeros([BLOCK_D], dtype=tl.float32)",
            "for start in range(0, S, BLOCK_C):", "    rows = start + offs_c",
            "    x = tl.load(BT + n * sb_n + offs_d[:, None] * sb_d + rows[None, :] * sb_s, "
            "mask=(offs_d[:, None] < D) & (rows[None, :] < S), other=0.0)",
            '    x = tl.where(rows[None, :] < S, x.to(tl.float32), float("-inf"))',
            "    m_new = tl.maximum(m_k, tl.max(x, axis=1))",
            "    l_k = l_k * tl.exp(m_k - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)",
            "    m_k = m_new"]


def _loads(spec: LinearAttentionSpec, names: str, grad: bool = False) -> list[str]:
    """Loads of the chunk at ``rows``: ``a`` (C, D), ``bt`` (D, C), ``v`` (C, E), ``g`` (C, E);
    ``a`` and ``bt`` as features (the spec's feature maps applied as they are loaded)."""
    lines = []
    for name in names.split():
        if name == "a":
            mask = "(rows[:, None] < L) & (offs_d[None, :] < D)"
            lines.append("a = tl.load(A + n * sa_n + rows[:, None] * sa_l + offs_d[None, :] * sa_d, "
                         f"mask={mask}, other=0.0)")
            lines += _featured("a", spec.phi_a, mask, "A")
        elif name == "bt":
            mask = "(offs_d[:, None] < D) & (rows[None, :] < S)"
            lines.append("bt = tl.load(BT + n * sb_n + offs_d[:, None] * sb_d + rows[None, :] * sb_s, "
                         f"mask={mask}, other=0.0)")
            lines += _featured("bt", spec.phi_b, mask, "BT")
        elif name == "v" and spec.values:
            lines.append("v = tl.load(V + n * sv_n + rows[:, None] * sv_s + offs_e[None, :] * sv_e, "
                         "mask=(rows[:, None] < S) & (offs_e[None, :] < E), other=0.0)")
        elif name == "v":  # the normaliser: keys' features times a column of ones
            lines.append("v = (tl.where(offs_e[None, :] < E, 1.0, 0.0) + tl.zeros([BLOCK_C, BLOCK_E], dtype=tl.float32)).to(BT.dtype.element_ty)")
        elif name == "g":
            lines.append("g = tl.load(G + n * sg_n + rows[:, None] * sg_l + offs_e[None, :] * sg_e, "
                         "mask=(rows[:, None] < L) & (offs_e[None, :] < E), other=0.0)")
    lines.append("if DOT_F32:")
    lines += [f"    {name} = {name}.to(tl.float32)" for name in names.split()]
    return lines


def _dot(x: str, y: str) -> str:
    return f"tl.dot({x}, {y}, input_precision=PREC)"


def _f32(x: str) -> str:
    """An input tile in float32, to meet a float32 state or block (exact: no rounding)."""
    return f"{x}.to(tl.float32)"


_LOWER = "tl.where(rows[:, None] >= rows[None, :], {}, 0.0)"  # query row i sees key j <= i


def _forward(spec: LinearAttentionSpec) -> list[str]:
    state = "state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)"
    store = ["tl.store(O + n * so_n + rows[:, None] * so_l + offs_e[None, :] * so_e, out.to(O.dtype.element_ty),",
             "         mask=(rows[:, None] < L) & (offs_e[None, :] < E))"]
    if not spec.causal:
        return [state, *_key_stats(spec), "for start in range(0, S, BLOCK_C):", "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "bt v")),
                f"    state += {_dot('bt', 'v')}",
                "for start in range(0, L, BLOCK_C):", "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "a")),
                f"    out = {_dot(_f32('a'), 'state')}", *("    " + x for x in store)]
    return [state, "for start in range(0, L, BLOCK_C):", "    rows = start + offs_c",
            *("    " + x for x in _loads(spec, "a bt v")),
            f"    p = {_LOWER.format(_dot('a', 'bt'))}",
            f"    out = {_dot(_f32('a'), 'state')} + {_dot('p', _f32('v'))}",
            f"    state += {_dot('bt', 'v')}", *("    " + x for x in store)]


def _backward_da(spec: LinearAttentionSpec) -> list[str]:
    store = ["tl.store(DA + eb * sda_e + n * sda_n + rows[:, None] * sda_l + offs_d[None, :], da,",
             "         mask=(rows[:, None] < L) & (offs_d[None, :] < D))"]
    head = ["eb = tl.program_id(1).to(tl.int64)", "state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)"]
    if not spec.causal:
        return [*head, *_key_stats(spec), "for start in range(0, S, BLOCK_C):", "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "bt v")), f"    state += {_dot('bt', 'v')}",
                "for start in range(0, L, BLOCK_C):", "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "g")),
                f"    da = {_dot(_f32('g'), 'tl.trans(state)')}", *("    " + x for x in store)]
    return [*head, "for start in range(0, L, BLOCK_C):", "    rows = start + offs_c",
            *("    " + x for x in _loads(spec, "bt v g")),
            f"    dp = {_LOWER.format(_dot('g', 'tl.trans(v)'))}",
            f"    da = {_dot(_f32('g'), 'tl.trans(state)')} + {_dot('dp', _f32('tl.trans(bt)'))}",
            f"    state += {_dot('bt', 'v')}", *("    " + x for x in store)]


def _backward_dbdv(spec: LinearAttentionSpec) -> list[str]:
    stores = ["tl.store(DB + eb * sdb_e + n * sdb_n + rows[:, None] * sdb_s + offs_d[None, :], db,",
              "         mask=(rows[:, None] < S) & (offs_d[None, :] < D))"]
    if spec.values:
        stores += ["tl.store(DV + n * sdv_n + rows[:, None] * sdv_s + offs_e[None, :] * sdv_e, dv.to(DV.dtype.element_ty),",
                   "         mask=(rows[:, None] < S) & (offs_e[None, :] < E))"]
    head = ["eb = tl.program_id(1).to(tl.int64)", "dstate = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)"]
    dv_line = f"dv = {_dot(_f32('tl.trans(bt)'), 'dstate')}"
    db_line = f"db = {_dot(_f32('v'), 'tl.trans(dstate)')}"
    if not spec.causal:
        return [*head, *(_key_stats(spec) if spec.values else []), "for start in range(0, L, BLOCK_C):",
                "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "a g")), f"    dstate += {_dot('tl.trans(a)', 'g')}",
                "for start in range(0, S, BLOCK_C):", "    rows = start + offs_c",
                *("    " + x for x in _loads(spec, "bt v" if spec.values else "v")),
                *(["    " + dv_line] if spec.values else []), "    " + db_line, *("    " + x for x in stores)]
    return [*head, "chunks = tl.cdiv(L, BLOCK_C)", "for i in range(0, chunks):",
            "    rows = (chunks - 1 - i) * BLOCK_C + offs_c",
            *("    " + x for x in _loads(spec, "a bt v g")),
            *([f"    p = {_LOWER.format(_dot('a', 'bt'))}",
               f"    {dv_line} + {_dot('tl.trans(p)', _f32('g'))}"] if spec.values else []),
            f"    dp = {_LOWER.format(_dot('g', 'tl.trans(v)'))}",
            f"    {db_line} + {_dot('tl.trans(dp)', _f32('a'))}",
            f"    dstate += {_dot('tl.trans(a)', 'g')}", *("    " + x for x in stores)]


def _block(lines: list[str]) -> str:
    return "\n".join("    " + line for line in lines)


_TILES = ("BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DOT_F32: tl.constexpr,\n"
          "    PREC: tl.constexpr")
_IN = "L, S, D, E, sa_n, sa_l, sa_d, sb_n, sb_d, sb_s, sv_n, sv_s, sv_e"


def _source(name: str, spec: LinearAttentionSpec) -> str:
    dv_args = "DV, sdv_n, sdv_s, sdv_e, " if spec.values else ""
    return f'''# Generated by fxfuse from the spec below; the same spec always gives these same bytes.
# {spec.describe()}
# spec: {spec.to_json()}
import triton
import triton.language as tl


@triton.jit
def {name}_forward(A, BT, V, O, {_IN}, so_n, so_l, so_e,
                   {_TILES}):
{_PRELUDE}{_block(_forward(spec))}


@triton.jit
def {name}_backward_da(G, BT, V, DA, {_IN}, sg_n, sg_l, sg_e, sda_e, sda_n, sda_l,
                       {_TILES}):
{_PRELUDE}{_block(_backward_da(spec))}


@triton.jit
def {name}_backward_dbdv(G, A, BT, V, DB, {dv_args}{_IN}, sg_n, sg_l, sg_e, sdb_e, sdb_n, sdb_s,
                         {_TILES}):
{_PRELUDE}{_block(_backward_dbdv(spec))}
'''


def generate(spec: LinearAttentionSpec) -> Kernel:
    """The kernel module for ``spec``: its name and source (pure text: needs no GPU)."""
    name = kernel_name("linear_attention", spec.to_json())
    return Kernel(name, _source(name, spec), spec=spec.describe())
