"""``--target sm_90`` of ``fxfuse explain`` and ``fxfuse kernels``: every generated kernel compiled
for that GPU without one, at every launch config fxfuse would try (``runtime.static_check``),
printed per kernel function and config, or as one JSON object per line."""
from __future__ import annotations

import json

import torch

from fxfuse.runtime.static_check import check, launch

# Sizes assumed for kernel files, whose headers carry the spec but not the sizes it ran at.
FILE_HEAD_DIMS = (64, 128)
FILE_LENGTH = 4096
FILE_NORM_WIDTH = 4096
_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64"}


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def launches_of_graph(gm: torch.fx.GraphModule) -> list[dict]:
    """One launch per distinct (kernel, sizes) among the fused operators of a rewritten graph, at
    the sizes the graph captured (its nodes' fake tensors)."""
    from fxfuse.spec import NormSpec
    from fxfuse.spec_attention import AttentionSpec

    found: dict[str, dict] = {}
    for node in gm.graph.nodes:
        name = getattr(node.target, "name", lambda: "")() if node.op == "call_function" else ""
        if not name.startswith("fxfuse::"):
            continue
        op = name.removeprefix("fxfuse::")
        spec_text = next((a for a in node.args if isinstance(a, str)), None)
        vals = [a.meta.get("val") if hasattr(a, "meta") else None for a in node.args[:3]]
        if spec_text is None or vals[0] is None:
            continue
        if op == "attention":
            q, k, v = vals
            item = launch(AttentionSpec.from_json(spec_text), d=q.shape[-1], dv=v.shape[-1], lq=q.shape[-2],
                          lk=k.shape[-2], dtype=_dtype(q))
        elif op == "attention_differential":  # (q1, k1, q2, k2, v, ...): both halves' kernels
            q, k, v = vals[0], vals[1], node.args[4].meta.get("val")
            item = launch(AttentionSpec.from_json(spec_text), d=q.shape[-1], dv=v.shape[-1], lq=q.shape[-2],
                          lk=k.shape[-2], dtype=_dtype(q))
        elif op in ("norm", "add_norm"):
            item = launch(NormSpec.from_json(spec_text), n=vals[0].shape[-1], dtype=_dtype(vals[0]))
        elif op == "linear_attention" and _dtype(vals[0]) != "float64":
            from fxfuse.spec_linear_attention import LinearAttentionSpec

            item = launch(LinearAttentionSpec.from_json(spec_text), d=vals[0].shape[-1],
                          e=vals[2].shape[-1] if vals[2] is not None else 1, dtype=_dtype(vals[0]))
        else:
            continue
        item["sizes"] = {k: int(v) if isinstance(v, int) or hasattr(v, "__int__") and not isinstance(v, str) else v
                         for k, v in item["sizes"].items()}
        found.setdefault(json.dumps(item, sort_keys=True), item)
    return list(found.values())


def launches_of_files(kernels: list[dict]) -> list[dict]:
    """Launches for kernel files (``fxfuse kernels DIR``): attention at head dims 64 and 128 and
    length 4096 in bf16, norms over rows of 4096 (the files do not record sizes)."""
    from fxfuse.spec import NormSpec
    from fxfuse.spec_attention import AttentionSpec

    out = []
    for k in kernels:
        text = json.dumps(k["spec"], sort_keys=True, separators=(",", ":"))
        if k["name"].startswith("fxfuse_attention_"):
            spec = AttentionSpec.from_json(text)
            out += [launch(spec, d=d, dv=d, lq=FILE_LENGTH, lk=FILE_LENGTH, dtype="bfloat16") for d in FILE_HEAD_DIMS]
        elif k["name"].startswith("fxfuse_linear_attention_"):
            from fxfuse.spec_linear_attention import LinearAttentionSpec

            spec = LinearAttentionSpec.from_json(text)
            out += [launch(spec, d=d, e=d if spec.values else 1, dtype="bfloat16") for d in FILE_HEAD_DIMS]
        else:
            spec = NormSpec.from_json(text)
            out.append(launch(spec, n=FILE_NORM_WIDTH, dtype=spec.out_dtype))
    return out


def print_rows(launches: list[dict], target: str, as_json: bool) -> int:
    """Compile and print; returns the exit status (1 when a kernel function has no config that
    compiles without spilling)."""
    if not launches:
        print("no fused kernels to check")
        return 1
    if not as_json:
        print(f"kernels compiled for {target} (no GPU needed; Triton's compiler and ptxas):")
        print(f"  {'kernel / function':<44} {'sizes':<28} {'tile':>8} {'warps':>5} {'stages':>6} {'regs':>5} "
              f"{'spills':>6} {'smem':>7} mma")
    good: dict[tuple, bool] = {}
    for row in check(launches, target):
        fn = (row["kernel"], row["function"], json.dumps(row["sizes"], sort_keys=True))
        good[fn] = good.get(fn, False) or (row["spills"] == 0 and "error" not in row)
        if as_json:
            print(json.dumps({k: row[k] for k in ("kernel", "function", "config", "registers", "spills",
                                                  "shared_bytes", "mma", "target", "sizes") if k in row}
                             | ({"error": row["error"]} if "error" in row else {})), flush=True)
            continue
        c, sizes = row["config"], " ".join(f"{k}={v}" for k, v in row["sizes"].items()
                                           if k != "dtype" and not (k == "dv" and v == row["sizes"].get("d")))
        sizes += " " + _SHORT.get(row["sizes"].get("dtype"), "")
        line = (f"  {row['kernel'] + ' ' + row['function']:<44} {sizes[:28]:<28} {c['BLOCK_M']:>3}x{c['BLOCK_N']:<4} "
                f"{c['num_warps']:>5} {c['num_stages']:>6} {row['registers']:>5} {row['spills']:>6} "
                f"{row['shared_bytes']:>7} {row['mma']}")
        print(line + (f"  ({row['error']})" if "error" in row else ""), flush=True)
    bad = [f"{k} {f}" for (k, f, _), ok in good.items() if not ok]
    if bad and not as_json:
        print(f"no config without spills for: {', '.join(bad)}")
    return 1 if bad else 0
