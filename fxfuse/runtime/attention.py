"""Launching the attention kernels (``fxfuse.codegen.attention`` renders them): the forward, the
two backward kernels and the dropout-mask kernel, with their grids, tile lists and tile sizes."""
from __future__ import annotations

import functools

import torch
import triton

from fxfuse.lowering.attention import lower_attention
from fxfuse.lowering.attention_tiles import tile_lists
from fxfuse.runtime import attention_windows as windows, functions
from fxfuse.runtime.configs import LaunchConfig, attention_configs, choose, length_bucket
from fxfuse.runtime.arguments import extra_4d, output_buffer, seed_args
from fxfuse.spec import NormSpec
from fxfuse.spec_attention import AttentionSpec

def device_arch(device) -> int | None:
    """The compute capability of a CUDA device as 80, 90, ...; None off CUDA (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def launch_configs(spec: AttentionSpec, function: str, q, k, v, arch: int | None = None) -> list[LaunchConfig]:
    """The configs fxfuse tries for ``function`` at these inputs' sizes (``arch`` defaults to the
    inputs' device's)."""
    arch = device_arch(q.device) if arch is None else arch
    d, dv, lq, lk = windows.dims(spec, q, k, v)
    return attention_configs(arch, function, d, dv, _dtype_name(q.dtype), lq, lk, tile_inputs(spec),
                             halves=2 if spec.differential else 1)


def tile_inputs(spec: AttentionSpec) -> int:
    """How many extra tensors the kernels read as a (BLOCK_M, BLOCK_N) tile per key tile (masks,
    biases, factor tensors; not the per-head inputs of index expressions, read once)."""
    return len({s.input for s in spec.steps if s.input >= 0 and spec.inputs[s.input] != "head"})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pick(spec: AttentionSpec, function: str, q, k, v, run, config: LaunchConfig | None) -> None:
    """Run ``run(config)`` with the given config, else with the tuned one for this launch's key
    (the split-key forward tries the forward's configs: the same tile body)."""
    if config is None:
        plan = lower_attention(spec)
        d, dv, lq, lk = windows.dims(spec, q, k, v)
        key = (spec.to_json(), function, d, dv, q.dtype, length_bucket(lq), length_bucket(lk), plan.skip_above_diagonal)
        config = choose(key, launch_configs(spec, function.removesuffix("_split"), q, k, v), run)
    run(config)


def _grid_meta(config: LaunchConfig, d: int, dv: int, on_gpu: bool) -> dict:
    meta = dict(BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(d)),
                BLOCK_DV=max(16, triton.next_power_of_2(dv)), DOT_F32=not on_gpu)
    if on_gpu:  # the interpreter takes neither
        meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
    return meta


def dropout_mask(spec: AttentionSpec, seed: torch.Tensor, shape4, device) -> torch.Tensor:
    """The keep mask (B, H, Lq, Lk) bool that the kernels draw for ``seed``, from the same
    ``dropout_keep`` function (any tile size draws the same mask: the draw is per element)."""
    kernel = functions(spec)["dropout_mask"]
    b, h, lq, lk = shape4
    block = 16 if device_arch(device) is None else 64
    keep = torch.empty((b, h, lq, lk), dtype=torch.uint8, device=device)
    if keep.numel():
        kernel[(triton.cdiv(lq, block), triton.cdiv(lk, block), b * h)](
            *seed_args(spec, seed), keep, lq, lk, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


def tiles(spec: AttentionSpec, shape4, config: LaunchConfig, device) -> tuple:
    """The tile lists the kernels read when the spec has index-expression masks, else (): a
    function of (spec, sizes, tile size), computed and cached per launch size."""
    if not any(s.op == "fill" and s.expr is not None for s in spec.steps):
        return ()
    return tile_lists(spec, shape4, config.BLOCK_M, config.BLOCK_N, device)


def rope_tables(spec: AttentionSpec, tables, q, k) -> list[torch.Tensor]:
    """The cos and sin tables of the rotated operands (see fxfuse.ops.attention_rope) as the kernels
    read them: (B, L, D) views, broadcast dims at stride 0; then the QK-norms' parameters as (D,)
    vectors (fxfuse.ops.attention_qk_norm)."""
    lengths = [(q.shape[0], q.shape[2], q.shape[3])] * 2 * bool(spec.rope_q) + \
        [(k.shape[0], k.shape[2], k.shape[3])] * 2 * bool(spec.rope_k)
    norms = [NormSpec.from_json(text) for text in (spec.norm_q, spec.norm_k) if text]
    if len(tables) != len(lengths) + sum(len(ns.params) for ns in norms):
        raise ValueError(f"fxfuse.attention_rope: {len(tables)} tables for a spec rotating {len(lengths) // 2} "
                         f"operand(s) and normalising {len(norms)}")
    return [t.expand(shape) for t, shape in zip(tables, lengths)] + [p.reshape(-1) for p in tables[len(lengths):]]


def forward(spec: AttentionSpec, q, k, v, extras, out_dtype: torch.dtype | None = None, seed=None,
            merge_heads: bool = False, config: LaunchConfig | None = None, splits: int | None = None, tables=()):
    """Launch the forward kernel; returns (out (B, H, Lq, Dv), stats (2, B*H, Lq) float32): each
    query row's running max m and sum l (its log-sum-exp is m + log(l)), of the undropped scores.

    ``out_dtype`` (the backward's float32) also turns the user's roundings of the scores off, so
    that the log-sum-exp matches the backward's unrounded recomputation. ``seed`` draws the
    dropout mask of a spec with dropout (see ``dropout_mask``). With ``merge_heads`` the output is
    written in (B, Lq, H, Dv) memory order (the kernel stores through its strides). ``config``
    fixes the launch config (else the tuned one for this key, see ``runtime.configs``). ``splits``
    cuts the keys into that many ranges run by separate programs and combined (decoding on a GPU:
    see ``runtime.attention_decode``; None decides by the launch's shape, 1 never splits). ``tables``:
    the cos and sin tables of a spec with RoPE (see ``rope_tables``; such specs never split)."""
    from fxfuse.codegen.attention_decode import splittable
    from fxfuse.runtime import attention_decode

    if splits is None:
        splits = 1 if spec.windows else attention_decode.decode_splits(spec, q, k)
    if splits > 1 and splittable(spec) is None:
        return attention_decode.split_forward(spec, q, k, v, extras, out_dtype, seed, merge_heads, config, splits)
    kernel = functions(spec)["forward"]
    b, h, lq, d, _, lk, dv = windows.sizes(spec, q, k, v)
    out = windows.image_buffer(spec, v, v.shape[-1], out_dtype or v.dtype) if spec.windows else \
        output_buffer((b, h, lq, dv), out_dtype or v.dtype, q.device, merge_heads)
    stats = torch.empty((2, b * h, lq), dtype=torch.float32, device=q.device)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    ts = rope_tables(spec, tables, q, k)

    def run(c: LaunchConfig) -> None:
        kernel[(triton.cdiv(lq, c.BLOCK_M), b * h)](
            q, k, v, out, stats, *es, *tiles(spec, (b, h, lq, lk), c, q.device)[:3], *seed_args(spec, seed), *ts,
            *st(q), *st(k), *st(v), *st(out), *(s for e in es for s in e.stride()),
            *(s for t in ts for s in t.stride()), h,
            spec.kv_groups, lq, lk, d, dv, ROUND=out_dtype is None, **_grid_meta(c, d, dv, q.is_cuda))

    st = functools.partial(windows.strides4, spec)
    if out.numel():
        _pick(spec, "forward", q, k, v, run, config)
    return out, stats


def backward(spec: AttentionSpec, grad_out, q, k, v, extras, extra_grads: list[bool] | None = None, seed=None,
             config: LaunchConfig | None = None, tables=()):
    """Launch the backward kernels; returns [dq, dk, dv] in q's, k's and v's shapes and dtypes,
    then one entry per extra: with ``extra_grads`` (one flag per extra), the gradient of each
    flagged bias ("add" steps) or factor tensor ("mul"/"div" steps) in its shape and dtype, else
    None. ``seed`` is the forward's: the kernels redraw its dropout mask. ``config`` fixes the
    launch config of all three kernels (else each is tuned for its key).

    The forward kernel runs again for the log-sum-exp and the output (delta = rowsum(dO * O)):
    the operator does not return them yet, so the backward pays one forward pass.
    """
    # delta = rowsum(dO * O) stands for rowsum(dP * P): with O rounded to bf16 its error is the
    # same for every key of a row and adds up coherently in dq and dk, so O is kept in float32.
    b, h, lq, d, hkv, lk, dv_dim = windows.sizes(spec, q, k, v)
    st = functools.partial(windows.strides4, spec)
    if spec.normalizer == "sigmoid":  # no row statistics: the kernels recompute p = sigmoid(s) alone
        stats = delta = torch.empty(0, dtype=torch.float32, device=q.device)
    else:
        out, stats = forward(spec, q, k, v, extras, out_dtype=torch.float32, seed=seed, config=config, tables=tables)
        delta = windows.rows_of((grad_out.float() * out.float()).sum(-1, keepdim=True), spec).reshape(b * h, lq).contiguous()
    if spec.windows:  # the kernels store dq, dk, dv at image positions
        dq, dk, dv = (windows.image_buffer(spec, t, t.shape[-1], torch.float32) for t in (q, k, v))
    else:
        dq = torch.empty((b, h, lq, d), dtype=torch.float32, device=q.device)
        dk = torch.empty((b, h, lk, d), dtype=torch.float32, device=q.device)
        dv = torch.empty((b, h, lk, dv_dim), dtype=torch.float32, device=q.device)
    es = [extra_4d(e, (b, h, lq, lk)) for e in extras]
    ts = rope_tables(spec, tables, q, k)

    def common(c: LaunchConfig) -> tuple:
        return (q, k, v, grad_out, stats, delta, *es, *tiles(spec, (b, h, lq, lk), c, q.device), *seed_args(spec, seed),
                *ts, *st(q), *st(k), *st(v), *st(grad_out), *(s for e in es for s in e.stride()),
                *(s for t in ts for s in t.stride()), h,
                spec.kv_groups, lq, lk, d, dv_dim)

    kernels = functions(spec)
    extra_grads = list(extra_grads or [False] * len(extras))
    # (step, extra) of the biases' and the factor tensors' steps
    adds = [(n, step.input) for n, step in enumerate(spec.steps) if step.op == "add" and step.input >= 0]
    factors = [(n, step.input) for n, step in enumerate(spec.steps) if step.op in ("mul", "div") and step.input >= 0]
    want_bias, want_factor = (any(extra_grads[i] for _, i in steps) for steps in (adds, factors))
    # Per score, each add step's dS and each factor step's gradient, zeros where the kernel skips a
    # tile (exactly zero probability there; no factor tensor follows the fill that hides it, see
    # lowering.skippable_fill, so dS is 0 there too); only allocated when a tensor of that kind
    # needs its gradient (dq stands in otherwise: the flag is off, nothing is stored). One flag
    # per kind, a buffer per step.
    per_score = {n: torch.zeros((b, h, lq, lk), dtype=torch.float32, device=q.device)
                 for steps, want in ((adds, want_bias), (factors, want_factor)) if want for n, _ in steps}
    flags = dict(**({"BIAS_GRAD": want_bias} if adds else {}), **({"FACTOR_GRAD": want_factor} if factors else {}))
    want_sink = spec.sinks >= 0 and extra_grads[spec.sinks]
    # Each query row's sink gradient (the dq kernel writes it); dq stands in when none is wanted.
    dsink = torch.zeros((b * h, lq), dtype=torch.float32, device=q.device) if want_sink else dq
    if spec.sinks >= 0:
        flags["SINK_GRAD"] = want_sink
    on_gpu = q.is_cuda

    def run_dkdv(c: LaunchConfig) -> None:
        kernels["backward_dkdv"][(triton.cdiv(lk, c.BLOCK_N), b * h)](
            *common(c), dk, dv, ROUND=False, **_grid_meta(c, d, dv_dim, on_gpu))

    def run_dq(c: LaunchConfig) -> None:
        kernels["backward_dq"][(triton.cdiv(lq, c.BLOCK_M), b * h)](
            *common(c), dq, *(per_score.get(n, dq) for n, _ in adds + factors), *([dsink] if spec.sinks >= 0 else []),
            ROUND=False, **flags,
            **_grid_meta(c, d, dv_dim, on_gpu))

    if q.numel() and k.numel():
        _pick(spec, "backward_dkdv", q, k, v, run_dkdv, config)
        _pick(spec, "backward_dq", q, k, v, run_dq, config)
    else:
        dq.zero_(), dk.zero_(), dv.zero_()
    if spec.kv_groups > 1:  # a kv head's gradient sums over the query heads that read it
        dk, dv = (g.unflatten(1, (hkv, spec.kv_groups)).sum(2) for g in (dk, dv))
    d_extras: list[torch.Tensor | None] = [None] * len(extras)
    for n, i in adds + factors:
        if extra_grads[i]:  # summed over the dims the tensor broadcasts along, as autograd would
            shape4 = (1,) * (4 - extras[i].dim()) + tuple(extras[i].shape)
            d = per_score[n].sum_to_size(shape4).reshape(extras[i].shape)
            d_extras[i] = d if d_extras[i] is None else d_extras[i] + d
    if want_sink:  # per row, summed over the dims the sink column broadcasts along
        e = extras[spec.sinks]
        shape4 = (1,) * (4 - e.dim()) + tuple(e.shape)
        d_extras[spec.sinks] = dsink.view(b, h, lq, 1).sum_to_size(shape4).reshape(e.shape)
    return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            *(d if d is None else d.to(e.dtype) for d, e in zip(d_extras, extras))]
