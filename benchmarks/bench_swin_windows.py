"""Swin's windows addressed by index against the partition left in the graph (issue 12, item 6).

transformers' SwinModel (random weights, eager attention) rewritten by fxfuse twice: the default
pipeline (``address-windows`` last: ``fxfuse.window_attention`` on image tensors) and the same
pipeline without it (the roll, partition and reverse copies stay in the graph around
``fxfuse.attention``), plus eager. Per row: the median process CPU time of interleaved calls
(inference under no_grad, and a training step: forward, sum, backward) and the largest difference
from eager. On a CPU the operator builds the partition itself, and its backward partitions q, k
and v again, so the windows row is slower there (which is why the default pipeline addresses
windows only where the kernels run); the gain is the GPU kernels' (no copies), timed with
``--device cuda``.

    python benchmarks/bench_swin_windows.py                  # CPU, 1 thread, about a minute
    python benchmarks/bench_swin_windows.py --device cuda --side 56 --window 7

Results: benchmarks/results/swin_windows_<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_norm import machine_info, machine_slug  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.passes.attention_windows import AddressWindows  # noqa: E402
from fxfuse.passes.pipeline import DEFAULT_PIPELINE, parse_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).last_hidden_state


def make(args, device):
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(image_size=args.side, patch_size=1, num_channels=3, embed_dim=args.dim, depths=[args.layers],
                        num_heads=[args.heads], window_size=args.window, drop_path_rate=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return Hidden(SwinModel(config, add_pooling_layer=False)).to(device), \
        torch.randn(args.batch, 3, args.side, args.side, device=device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", type=int, default=16)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x = make(args, args.device)
    without = DEFAULT_PIPELINE.replace(",address-windows", "")
    # On a CPU the default pipeline keeps the partition (the operator would build it itself): the
    # windows row asks for the addressing there (on_cpu) to measure that choice.
    impls = {"eager": model,
             "windows": fxfuse.rewrite(model, (x,), passes=[*parse_pipeline(without), AddressWindows(on_cpu=True)]).module,
             "partition": fxfuse.rewrite(model, (x,), passes=without).module}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    for mode in ("inference", "train"):
        times, diffs = {k: [] for k in impls}, {k: 0.0 for k in impls}
        with torch.no_grad():
            want = model(x)
        for i in range(args.rounds + 2):
            for name in list(impls)[i % 3:] + list(impls)[:i % 3]:  # rotated: load hits each alike
                m = impls[name]
                sync()
                t = time.process_time() if args.device == "cpu" else time.perf_counter()
                if mode == "inference":
                    with torch.no_grad():
                        out = m(x)
                else:
                    out = m(x)
                    out.sum().backward()
                sync()
                if i >= 2:  # two warm-up rounds
                    times[name].append(((time.process_time() if args.device == "cpu" else time.perf_counter()) - t) * 1e3)
                diffs[name] = max(diffs[name], (out.detach() - want).abs().max().item())
        base = statistics.median(times["eager"])
        for name in impls:
            ms = statistics.median(times[name])
            rows.append({"mode": mode, "impl": name, "ms": round(ms, 3), "speedup_vs_eager": round(base / ms, 3),
                         "vs_partition": round(statistics.median(times["partition"]) / ms, 3),
                         "max_abs_diff_vs_eager": diffs[name]})
            print(rows[-1])
    out = Path(args.out) if args.out else RESULTS / f"swin_windows_{machine_slug(args.device)}.json"
    timing = "median process CPU ms" if args.device == "cpu" else "median wall ms"
    out.write_text(json.dumps({"machine": machine_info(args.device), "command": sys.argv, "args": vars(args),
                               "timing": f"{timing} of {args.rounds} interleaved calls after 2 warm-up rounds",
                               "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
