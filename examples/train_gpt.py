"""Train a small GPT twice, eagerly and through fxfuse, and check that the loss curves agree.

The model is written the way research code writes it (nanoGPT style): causal self-attention by
hand (``q @ k.transpose * scale``, a ``tril`` buffer as mask with ``masked_fill(-inf)``, softmax,
dropout, ``@ v``), ``nn.LayerNorm`` and a GELU MLP. fxfuse replaces the attention and norm sites
with its fused operators; their backward formulas then carry the gradients. Both runs start from
the same weights and see the same batches, so any gap between the curves is fxfuse's doing.

    python examples/train_gpt.py                       # 300 steps, fxfuse as torch.compile backend
    python examples/train_gpt.py --fxfuse rewrite      # through fxfuse.rewrite(model, example).module
    python examples/train_gpt.py --steps 30 --out /tmp/loss.png --device cuda

Runs on CPU as is (the fused operators use their exact torch reference there); on a GPU the fused
operators run the generated Triton kernels.
"""
import argparse
import copy
import math
import os
import random
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxfuse


def pyplot():
    """matplotlib's pyplot, imported only to plot (``make`` and the model need no matplotlib)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise SystemExit("train_gpt.py draws its plot with matplotlib: pip install -e '.[examples]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: no display needed, no GUI toolkit imported
    import matplotlib.pyplot as plt

    return plt


# Dropout is off for the comparison: with p > 0 each run draws its own random masks (the fused
# graph consumes the random stream in another order than eager does), so the two curves would
# differ by sampling noise and the comparison would say nothing about fxfuse. The dropout call
# stays in the model, so the attention pattern fxfuse has to recognise is the one people write.
DROPOUT = 0.0

# "Equal within noise": the largest gap between the two curves, over every step, relative to the
# eager loss at that step, stays below this. Both runs are float32; the fused operators round in
# another order than eager ops (about 1e-7 relative per op), and training amplifies such
# differences step after step. Measured on CPU: 1e-7 after 30 steps, 3e-5 after 300, 1e-4 after
# 600 (so much longer runs can pass the tolerance with no bug; compare at the default length).
# Bugs show far above it; measured at 300 steps by planting them in the eager model: a mask that
# lets each position see one future token 1.0, one LayerNorm bias left without its gradient 7e-2,
# 1% noise on one weight's gradient 4e-2, LayerNorm eps 1e-3 instead of 1e-5 8e-3.
RELATIVE_TOLERANCE = 1e-3


# ----------------------------------------------------------------------------- data

def make_text(n_sentences: int, seed: int = 0) -> str:
    """Sentences from a tiny grammar: learnable (the loss falls fast) and made here, no download."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "a small bird"]
    verbs = ["sees", "likes", "chases", "finds", "draws"]
    objects = ["the ball", "a red hat", "the moon", "two fish", "an apple"]
    places = ["in the garden", "at home", "by the river", "on the hill"]
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
        if rng.random() < 0.5:
            words.append(rng.choice(places))
        sentences.append(" ".join(words) + ".")
    return " ".join(sentences)


def make_batches(data: torch.Tensor, steps: int, batch: int, block: int, seed: int = 0) -> list:
    """Every step's (inputs, targets), drawn once, so both runs see exactly the same batches."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        starts = torch.randint(len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + block] for s in starts])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts])
        batches.append((x, y))
    return batches


# ----------------------------------------------------------------------------- model

class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, block: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_dropout, self.resid_dropout = nn.Dropout(dropout), nn.Dropout(dropout)
        self.register_buffer("causal", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.causal[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, block: int, dropout: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, block, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int = 64, heads: int = 4, layers: int = 2, dropout: float = DROPOUT):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, block, dropout) for _ in range(layers)))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        return self.head(self.ln_f(self.blocks(x)))


def make():
    """``(model, example_inputs)``: the GPT in training mode and one batch, for ``fxfuse explain
    examples/train_gpt.py:make``."""
    block = 32
    chars = sorted(set(make_text(2000)))
    torch.manual_seed(0)
    return GPT(len(chars), block), (torch.randint(0, len(chars), (4, block)),)


# ----------------------------------------------------------------------------- training

def train(model: nn.Module, params, batches: list, lr: float) -> list[float]:
    """One AdamW run over ``batches``; returns the loss of every step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    losses = []
    for x, y in batches:
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def through_fxfuse(model: nn.Module, how: str, example: torch.Tensor):
    """The model as fxfuse runs it, and a function returning the report of what was fused."""
    if how == "compile":
        backend = fxfuse.Backend()
        return torch.compile(model, backend=backend), backend.report
    res = fxfuse.rewrite(model, (example,))
    return res.module, res.report


def plot(eager: list[float], fused: list[float], how: str, path: str) -> None:
    plt = pyplot()
    steps = range(1, len(eager) + 1)
    gap = [abs(a - b) / a for a, b in zip(eager, fused)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    top.plot(steps, eager, label="eager", linewidth=2.5, color="tab:blue")
    top.plot(steps, fused, label=f"fxfuse ({how})", linewidth=1.2, linestyle="--", color="tab:orange")
    top.set_ylabel("training loss (cross-entropy)")
    top.set_title("Small GPT, same initial weights and batches: eager vs fxfuse")
    top.legend()
    top.grid(alpha=0.3)
    floor = 1e-9  # steps where the losses are bit-identical (gap 0) are drawn here, below float32's resolution
    bottom.semilogy(steps, [max(g, floor) for g in gap], color="tab:gray")
    bottom.axhline(RELATIVE_TOLERANCE, color="tab:red", linestyle=":", label=f"tolerance {RELATIVE_TOLERANCE:g}")
    bottom.set_xlabel("step")
    bottom.set_ylim(floor / 2, 1.0)
    bottom.set_ylabel("|difference| / loss")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--out", help="where to write the loss-curve plot (PNG; default: loss.png in a new "
                        "temporary folder, so that nothing is written where you run it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--fxfuse", choices=["compile", "rewrite"], default="compile",
                        help="torch.compile(model, backend='fxfuse') or fxfuse.rewrite(model, example).module")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    pyplot()  # before training: a missing matplotlib is said now, not after the runs
    if args.device == "cpu":
        # The tensors are tiny: one thread beats waking a pool for each small op (about 5x here),
        # and does not fight over cores with whatever else runs (pytest -n 2, a second run).
        torch.set_num_threads(1)

    block, batch = 32, 16
    text = make_text(2000)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    batches = [(x.to(args.device), y.to(args.device)) for x, y in make_batches(data, args.steps, batch, block)]

    torch.manual_seed(0)
    eager_model = GPT(len(chars), block).to(args.device)
    fused_model = copy.deepcopy(eager_model)  # same initial weights, its own parameters
    n_params = sum(p.numel() for p in eager_model.parameters())
    print(f"GPT: {n_params} parameters, vocab {len(chars)}, {len(text)} characters of text, "
          f"{args.steps} steps of batch {batch}x{block} on {args.device}")

    start = time.perf_counter()
    eager_losses = train(eager_model, eager_model.parameters(), batches, args.lr)
    eager_seconds = time.perf_counter() - start

    start = time.perf_counter()
    runner, report = through_fxfuse(fused_model, args.fxfuse, batches[0][0])
    fused_losses = train(runner, fused_model.parameters(), batches, args.lr)
    fused_seconds = time.perf_counter() - start

    print(f"\nwhat fxfuse fused ({args.fxfuse}):\n{report()}\n")
    if args.out is None:
        args.out = os.path.join(tempfile.mkdtemp(prefix="fxfuse-train-gpt-"), "loss.png")
    plot(eager_losses, fused_losses, args.fxfuse, args.out)

    gaps = [abs(a - b) / a for a, b in zip(eager_losses, fused_losses)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    print(f"eager  final loss: {eager_losses[-1]:.6f} (first {eager_losses[0]:.6f}, {eager_seconds:.1f}s)")
    print(f"fxfuse final loss: {fused_losses[-1]:.6f} (first {fused_losses[0]:.6f}, {fused_seconds:.1f}s with capture)")
    print(f"max |difference| / loss over {len(gaps)} steps: {gaps[worst]:.2e} (step {worst + 1}); "
          f"tolerance {RELATIVE_TOLERANCE:g}")
    print(f"plot: {args.out}")
    same = gaps[worst] < RELATIVE_TOLERANCE
    print("verdict: " + ("the curves are equal within noise" if same else "the curves DIFFER beyond noise"))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
