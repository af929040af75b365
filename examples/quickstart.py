"""fxfuse in one page: a small transformer block written naively, rewritten, checked, inspected.

Runs on CPU as is (the fused operators use their exact torch reference there); on a GPU the same
program runs the generated Triton kernels.
"""
import torch
import torch.nn as nn

import fxfuse


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Block(nn.Module):
    """A pre-norm transformer block with its norms and MLP written by hand."""

    def __init__(self, dim=64):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.final = nn.LayerNorm(dim)

    def forward(self, x):
        q, k, v = self.qkv(self.attn_norm(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        x = x + self.out(scores.softmax(-1) @ v)
        x = x + self.down(torch.relu(self.up(self.mlp_norm(x))))
        return self.final(x)


def make():
    """``(model, example_inputs)``: also what ``fxfuse explain examples/quickstart.py:make`` runs."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Block().to(device), (torch.randn(2, 16, 64, device=device),)


def main():
    model, (x,) = make()

    res = fxfuse.rewrite(model, (x,))
    print(res.report())
    print(f"\none generated kernel ({res.kernels[0].name}, {res.kernels[0].path}):\n")
    print(res.kernels[0].source)

    out, expected = res.module(x), model(x)
    torch.testing.assert_close(out, expected)
    print(f"rewritten output equals eager (max abs difference {(out - expected).abs().max().item():.2e})")

    compiled = torch.compile(model, backend="fxfuse")
    torch.testing.assert_close(compiled(x), expected)
    print("torch.compile(model, backend='fxfuse') output equals eager too")


if __name__ == "__main__":
    main()
