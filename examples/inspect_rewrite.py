"""Reading what fxfuse did, from a program: matches, misses, kernels, the rewritten graph, HTML.

(Not named inspect.py: a script's folder comes first on sys.path, and a file called inspect.py
would hide the standard library's inspect module from torch.)

Runs on CPU as is.
"""
import os
import tempfile

import torch
import torch.nn as nn

import fxfuse


class Model(nn.Module):
    """Two norms fxfuse fuses and two it must decline, because they are not what a fused norm computes."""

    def __init__(self, dim=32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        # Unbiased variance (torch.var's default) divides by N-1: not a LayerNorm.
        unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        # Mean over the sequence axis, not the features: not a norm over the last dimension.
        other_axis = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        return self.ln(rms) + unbiased + other_axis


def short(source: str) -> str:
    """``/long/path/file.py:12`` → ``file.py:12``."""
    return os.path.basename(source)


def make():
    """``(model, example_inputs)``: also what ``fxfuse explain examples/inspect_rewrite.py:make`` runs."""
    torch.manual_seed(0)
    return Model(), (torch.randn(2, 8, 32),)


def main():
    model, (x,) = make()
    res = fxfuse.rewrite(model, (x,))

    print(f"{len(res.matches)} fused site(s):")
    for m in res.matches:
        kernel = res.report_data.kernel_for(m)  # kernels are shared by sites with the same spec
        print(f"  kind={m.kind} source={short(m.source)}")
        print(f"    spec in words: {m.describe()}")
        print(f"    fused node:    {m.node} (in res.graph), kernel {kernel.name if kernel else '-'}")
        if hasattr(m.spec, "eps"):  # m.spec is the spec dataclass of the site's kind
            print(f"    eps read from the graph: {m.spec.eps}")

    print(f"\n{len(res.misses)} declined site(s):")
    for m in res.misses:
        print(f"  kind={m.kind} source={short(m.source)}: {m.reason}")
        print(f"    {m.code}")

    print(f"\n{len(res.kernels)} kernel(s):")
    for k in res.kernels:
        header = [line for line in k.source.splitlines() if line.startswith("#")]
        print(f"  {k.name}: {k.spec}\n    file {k.path}, {len(k.source.splitlines())} lines; header: {header[1]}")

    fused_calls = [n.target for n in res.graph.graph.nodes if str(n.target).startswith("fxfuse.")]
    print(f"\nthe rewritten graph calls: {sorted({str(t) for t in fused_calls})}")

    torch.testing.assert_close(res.module(x), model(x))
    print("the rewritten module's output equals eager")

    # The same report as one HTML page, with the graph before and after the passes drawn, the
    # replaced nodes and the fused ones marked.
    before = res.report_data.before  # a copy of the captured graph, taken before the passes ran
    print(f"graph before the passes: {len(before.nodes)} nodes, after: {len(res.graph.graph.nodes)}")
    path = os.path.join(tempfile.mkdtemp(prefix="fxfuse-"), "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(res.report_data.html())
    print(f"HTML report: {path}")


if __name__ == "__main__":
    main()
