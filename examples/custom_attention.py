"""A research attention written by hand -- ALiBi position bias, a sliding window and logit
soft-capping -- becomes one fused operator with one generated kernel. Prints the report and the
kernel; checks the output against eager. Runs on CPU as is."""
import math

import torch
import torch.nn as nn

import fxfuse


def alibi_slopes(n_heads: int) -> torch.Tensor:
    # The geometric slopes of the ALiBi paper: 2^(-8/n), 2^(-16/n), ...
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])


class WindowedAlibiSoftcapAttention(nn.Module):
    def __init__(self, dim=64, heads=4, max_len=128, window=8, softcap=30.0):
        super().__init__()
        self.heads, self.head_dim, self.softcap = heads, dim // heads, softcap
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        i = torch.arange(max_len)[:, None]
        j = torch.arange(max_len)[None, :]
        # Causal sliding window: key j is visible to query i when i - window < j <= i.
        self.register_buffer("visible", (j <= i) & (j > i - window), persistent=False)
        # ALiBi: a per-head linear penalty on the distance to the key.
        self.register_buffer("alibi", alibi_slopes(heads)[:, None, None] * (j - i).float(), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores + self.alibi[:, :n, :n]
        scores = self.softcap * torch.tanh(scores / self.softcap)
        scores = scores.masked_fill(~self.visible[:n, :n], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


def make():
    """``(model, example_inputs)``: also what ``fxfuse explain examples/custom_attention.py:make`` runs."""
    torch.manual_seed(0)
    return WindowedAlibiSoftcapAttention().eval(), (torch.randn(2, 32, 64),)


def main():
    model, (x,) = make()
    res = fxfuse.rewrite(model, (x,))
    print(res.report())
    attention_kernels = [k for k in res.kernels if "attention" in k.name]
    if attention_kernels:
        print(f"\nthe site's kernel, {attention_kernels[0].name}:\n")
        print(attention_kernels[0].source)
    out, expected = res.module(x), model(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    print(f"rewritten output equals eager (max abs difference {(out - expected).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
