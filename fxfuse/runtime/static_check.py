"""What a generated kernel compiles to on a GPU, found without one: registers, spills, shared
memory and the tensor-core instructions of every kernel function at every launch config fxfuse
would try at the captured sizes (``fxfuse explain MODEL --target sm_90``, ``fxfuse kernels DIR
--target sm_90``).

Triton compiles for a named target with no GPU and no CUDA driver: ``triton.compile(ASTSource(fn,
signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))`` lowers to PTX and runs the
``ptxas`` Triton ships (its ``-v`` report gives registers and spill bytes; the compiled metadata
the shared memory). It needs the kernel as a compiled ``JITFunction``, so it cannot run in a
process whose Triton interprets kernels (``TRITON_INTERPRET=1``, as in fxfuse's tests): such a
process runs the check in a child process without it. The signature stands for a launch at the
captured sizes: contiguous tensors (16-byte aligned pointers, unit inner strides, which Triton
specializes as it does at launch), sizes as 32-bit integers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from typing import Iterable

from fxfuse.runtime.configs import LaunchConfig, arch_of, attention_configs, norm_configs

_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64"}
ATTENTION_FUNCTIONS = ("forward", "backward_dkdv", "backward_dq")
NORM_FUNCTIONS = ("forward", "backward")


def launch(spec, **sizes) -> dict:
    """One site to check: its spec and the sizes it runs at (attention: d, dv, lq, lk, dtype;
    norm: n, dtype). Plain data, so it can travel to a child process as JSON."""
    kind = "linear_attention" if type(spec).__name__ == "LinearAttentionSpec" else "norm" if hasattr(spec, "eps") \
        else "attention"
    return {"spec": spec.to_json(), "kind": kind, "sizes": sizes}


def mma_class(ptx: str) -> str:
    """The tensor-core instruction class a kernel's PTX uses: Hopper's ``wgmma``, ``mma`` (Ampere's
    mma.sync), or ``none`` (FMA units only)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma" if re.search(r"\bmma\.sync", ptx) else "none"


def _ptxas_numbers(log: str) -> tuple[int, int]:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)) if registers else -1, sum(int(s) for s in spills)


def _signature(fn, pointer_types: dict, constants: dict, divisible: frozenset = frozenset()):
    """Triton's signature of ``fn`` for a launch: ``divisible`` names the integer arguments whose
    values are multiples of 16 there. Triton specializes a launch on that (``tt.divisibility``), and
    without it the compiler cannot prove 16-byte-aligned rows: no vectorized, asynchronous copies,
    so no software pipelining (every ``num_stages`` compiles alike) -- not what a GPU would run."""
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr or name in constants:
            signature[name], constexprs[name] = "constexpr", constants[name]
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # fresh torch allocations are 16-byte aligned
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
            if name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _divisible(fn, sizes: dict, norm: bool) -> frozenset:
    """The integer arguments that are multiples of 16 at a launch of contiguous tensors at
    ``sizes``: the sizes that are, and the strides of q, k, v, the output and its gradient (each
    a multiple of the head dims, of the row length for a norm) when the head dims (row) are."""
    dims = ("n",) if norm else ("d", "dv")
    rows = all(sizes.get(k, 1) % 16 == 0 for k in dims)
    named = {"n": "N", "d": "D", "dv": "DV", "lq": "LQ", "lk": "LK"}
    out = {named[k] for k, v in sizes.items() if k in named and isinstance(v, int) and v % 16 == 0}
    if rows:
        out |= {a for a in fn.arg_names if a.startswith("stride_") and not a.startswith("stride_e")}
    return frozenset(out)


def _attention_pointers(fn, spec, dtype: str) -> dict:
    types = {}
    for name in fn.arg_names:
        if name in ("Q", "K", "V", "O", "DO", "Q1", "K1", "Q2", "K2"):  # (1, 2: a differential site's halves)
            types[name] = _PTR[dtype]
        elif name in ("STATS", "DELTA", "DK", "DV_OUT", "DQ", "DSINK", "LAM") or re.fullmatch(r"D[BF]\d+", name) \
                or re.fullmatch(r"(STATS|DELTA|DK|DQ)[12]|O[12]F", name):
            types[name] = "*fp32"
        elif re.fullmatch(r"E\d+", name):
            kind = spec.inputs[int(name[1:])]
            types[name] = "*u8" if kind == "mask" else "*fp32" if kind == "head" else _PTR[dtype]
        elif name.endswith(("_NUM", "_IDX", "_PARTIAL")):
            types[name] = "*i32"
        elif name in ("SEED", "KEEP"):
            types[name] = "*i64" if name == "SEED" else "*u8"
    return types


def _compile(fn, signature, constexprs, attrs, arch: int, config: LaunchConfig) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True  # a cached binary would skip ptxas and its report
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    registers, spills = _ptxas_numbers(log.getvalue())
    return {"registers": registers, "spills": spills, "shared_bytes": int(compiled.metadata.shared),
            "mma": mma_class(compiled.asm["ptx"])}


def _functions(spec, sizes: dict, norm: bool) -> tuple[str, ...]:
    """The kernel functions a launch at these sizes may run: the split-key forward too when it is
    decode-shaped (a GPU splits the keys of such launches, see ``runtime.attention_decode``)."""
    from fxfuse.codegen.attention_decode import splittable
    from fxfuse.runtime.attention_decode import DECODE_ROWS

    if norm:
        return NORM_FUNCTIONS
    decoding = sizes["lq"] <= DECODE_ROWS and splittable(spec) is None
    return ATTENTION_FUNCTIONS + (("forward_split",) if decoding else ())


def check_in_process(launches: Iterable[dict], target: str, functions: tuple[str, ...] | None = None,
                     first_good: bool = False, last_first: bool = False,
                     configs: list[LaunchConfig] | None = None) -> Iterable[dict]:
    """Rows (one per kernel function and config, as ``fxfuse explain --target --json`` prints
    them) for each launch. ``first_good`` stops a function at its first config without spills
    (with wgmma, for a 16-bit forward on sm_90+), for quick checks such as CI's, which search
    from the end of the list (``last_first``: the small fallback config is last). ``configs``
    replaces fxfuse's candidate lists (to see one config, or one fxfuse would not try)."""
    from fxfuse.codegen import generate_kernel
    from fxfuse.codegen.attention_decode import generate_split
    from fxfuse.runtime.attention import tile_inputs
    from fxfuse.runtime.cache import load
    from fxfuse.spec import NormSpec
    from fxfuse.spec_attention import AttentionSpec

    arch = arch_of(target)
    for item in launches:
        if item["kind"] == "linear_attention":
            yield from _check_linear_attention(item, arch, functions)
            continue
        norm = item["kind"] == "norm"
        spec = (NormSpec if norm else AttentionSpec).from_json(item["spec"])
        sizes = item["sizes"]
        main_kernel = generate_kernel(spec)
        module = load(main_kernel)
        for function in functions or _functions(spec, sizes, norm):
            kernel = generate_split(spec) if function == "forward_split" else main_kernel
            fn = getattr(load(kernel) if function == "forward_split" else module, f"{kernel.name}_{function}")
            dtype = sizes.get("dtype", "bfloat16")
            if norm:
                tried = configs or norm_configs(arch, sizes["n"])
                params = {f"P{i}": _PTR[p.dtype] for i, p in enumerate(spec.params)}
                acc = "*fp64" if spec.compute_dtype == "float64" else "*fp32"
                types = {**{n: _PTR[dtype] for n in ("X", "R", "S", "Y", "DY", "DS", "DX")}, **params,
                         **{f"DP{i}": acc for i in range(len(spec.params))}}
            else:
                tried = configs or attention_configs(arch, function.removesuffix("_split"), sizes["d"], sizes["dv"],
                                                     dtype, sizes["lq"], sizes["lk"], tile_inputs(spec),
                                                     halves=2 if spec.differential else 1)
                types = _attention_pointers(fn, spec, dtype)
                if function == "forward_split":
                    types["O"] = "*fp32"  # the ranges' unnormalised float32 accumulators
            for config in (tried[::-1] if last_first else tried):
                constants = {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N, "ROUND": function.startswith("forward"),
                             "DOT_F32": False, "BIAS_GRAD": True, "FACTOR_GRAD": True, "SINK_GRAD": True,
                             "SAVE": True}  # (a differential forward in training writes what its backward reads)
                if not norm:
                    constants.update(BLOCK_D=max(16, 1 << (sizes["d"] - 1).bit_length()),
                                     BLOCK_DV=max(16, 1 << (sizes["dv"] - 1).bit_length()),
                                     **{s: 1 for s in ("stride_qd", "stride_kd", "stride_vd", "stride_od",
                                                       "stride_q1d", "stride_k1d", "stride_q2d", "stride_k2d")})
                signature, constexprs, attrs = _signature(fn, types, {k: v for k, v in constants.items()
                                                                        if k in fn.arg_names},
                                                          _divisible(fn, sizes, norm))
                row = {"kernel": kernel.name, "function": function,
                       "config": {"BLOCK_M": config.BLOCK_M, "BLOCK_N": config.BLOCK_N,
                                  "num_warps": config.num_warps, "num_stages": config.num_stages},
                       "target": f"sm_{arch}", "sizes": sizes}
                try:
                    row.update(_compile(fn, signature, constexprs, attrs, arch, config))
                except Exception as e:  # noqa: BLE001 -- reported per config, e.g. out of shared memory
                    row.update(registers=-1, spills=-1, shared_bytes=-1, mma="none",
                               error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                yield row
                wants_wgmma = arch >= 90 and function == "forward" and not norm and dtype != "float32"
                if first_good and row["spills"] == 0 and (row["mma"] == "wgmma" or not wants_wgmma):
                    break


def _check_linear_attention(item: dict, arch: int, functions) -> Iterable[dict]:
    """Rows for a linear attention launch (sizes: d, e, dtype): the one config the runtime uses."""
    from fxfuse.codegen.linear_attention import FUNCTIONS, generate
    from fxfuse.runtime.cache import load
    from fxfuse.runtime.linear_attention import gpu_tiles
    from fxfuse.spec_linear_attention import LinearAttentionSpec

    spec = LinearAttentionSpec.from_json(item["spec"])
    sizes = item["sizes"]
    kernel = generate(spec)
    module = load(kernel)
    tiles = gpu_tiles(sizes["d"], sizes["e"], spec.causal)
    config = LaunchConfig(tiles["BLOCK_C"], tiles["BLOCK_E"], tiles["num_warps"], tiles["num_stages"])
    dtype = _PTR[sizes.get("dtype", "bfloat16")]
    types = {"A": dtype, "BT": dtype, "V": dtype, "G": dtype, "O": dtype, "DV": dtype, "DA": "*fp32", "DB": "*fp32"}
    for function in functions or FUNCTIONS:
        fn = getattr(module, f"{kernel.name}_{function}")
        constants = {k: tiles[k] for k in ("BLOCK_C", "BLOCK_D", "BLOCK_E", "DOT_F32", "PREC")}
        # Contiguous (N, L, D) features, values and gradients; bt a transposed (N, S, D) (unit d stride):
        # every other stride is a multiple of D or E.
        unit = ("sa_d", "sb_d", "sv_e", "so_e", "sg_e", "sdv_e")
        divisible = frozenset(a for a in fn.arg_names if a[:1] == "s" and "_" in a and a not in unit) | {"D", "E"} \
            if sizes["d"] % 16 == 0 and sizes["e"] % 16 == 0 else frozenset()
        signature, constexprs, attrs = _signature(fn, {k: v for k, v in types.items() if k in fn.arg_names}, constants,
                                                  divisible)
        row = {"kernel": kernel.name, "function": function, "config": config.as_dict(), "target": f"sm_{arch}",
               "sizes": sizes}
        try:
            row.update(_compile(fn, signature, constexprs, attrs, arch, config))
        except Exception as e:  # noqa: BLE001 -- reported per function
            row.update(registers=-1, spills=-1, shared_bytes=-1, mma="none",
                       error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        yield row


def check(launches: list[dict], target: str, functions: tuple[str, ...] | None = None,
          first_good: bool = False, last_first: bool = False,
          configs: list[LaunchConfig] | None = None) -> Iterable[dict]:
    """``check_in_process``, in a child process when this one's Triton interprets kernels."""
    from fxfuse.config import interpreter_available

    if not interpreter_available():
        yield from check_in_process(launches, target, functions, first_good, last_first, configs)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FXFUSE_INTERPRET")}
    request = json.dumps({"launches": launches, "target": target, "functions": functions, "first_good": first_good,
                          "last_first": last_first, "configs": [c.as_dict() for c in configs or ()]})
    child = subprocess.run([sys.executable, "-m", "fxfuse.runtime.static_check"], input=request, text=True,
                           capture_output=True, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"fxfuse: the static GPU check failed in its child process:\n{child.stderr[-3000:]}")
    for line in child.stdout.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


def main() -> None:
    request = json.loads(sys.stdin.read())
    functions = tuple(request["functions"]) if request.get("functions") else None
    configs = [LaunchConfig(**c) for c in request.get("configs") or ()] or None
    for row in check_in_process(request["launches"], request["target"], functions, request.get("first_good", False),
                                request.get("last_first", False), configs):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
