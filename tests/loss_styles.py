"""The LM head and its cross-entropy written the ways real code writes them, each as a module
``forward(h, labels) -> loss`` with h (B, T, H) hidden states and labels (B, T) token ids.

Each style names where the form comes from; NEAR_MISSES look alike but must not be fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Head(nn.Module):
    def __init__(self, hidden: int, vocab: int, bias: bool = False):
        super().__init__()
        self.vocab = vocab
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)


class LinearThenFloat(_Head):
    """nanoGPT / the issue's form: ``F.cross_entropy(logits.float().view(-1, V), labels.view(-1))``."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), ignore_index=-100)


class MatmulTransposedWeight(_Head):
    """``h @ W.T`` with the weight used directly (tied-embedding heads)."""

    def forward(self, h, labels):
        logits = (h @ self.lm_head.weight.T).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))


class HiddenByVocabWeight(nn.Module):
    """A (H, V) projection matrix: ``h @ W`` (Megatron-style column layout)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.proj = nn.Parameter(torch.randn(hidden, vocab) / hidden ** 0.5)

    def forward(self, h, labels):
        return F.cross_entropy((h @ self.proj).float().reshape(-1, self.vocab), labels.reshape(-1))


class SumReduction(_Head):
    """transformers' ``fixed_cross_entropy`` with ``num_items_in_batch``: sum, then divide."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), ignore_index=-100, reduction="sum")
        return loss / 7.0


class PerTokenLoss(_Head):
    """``reduction="none"`` and a mask applied by hand (sequence-packing trainers)."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        per_token = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), reduction="none")
        mask = (labels.view(-1) != -100).float()
        return (per_token * mask).sum() / mask.sum().clamp(min=1)


class LabelSmoothing(_Head):
    """``label_smoothing=0.1`` (T5X / timm-style training recipes)."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1), label_smoothing=0.1)


class ZLoss(_Head):
    """PaLM's z-loss: ``1e-4 * logsumexp(logits)^2`` added to the cross-entropy over kept tokens."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        flat = labels.view(-1)
        ce = F.cross_entropy(logits.view(-1, self.vocab), flat)
        z = torch.logsumexp(logits, dim=-1).view(-1)
        keep = (flat != -100).float()
        return ce + 1e-4 * (z.pow(2) * keep).sum() / keep.sum()


class Softcapped(_Head):
    """Gemma 2's final logit softcapping (``logits / cap``, ``tanh``, ``* cap``) before the loss."""

    def forward(self, h, labels):
        logits = self.lm_head(h)
        logits = torch.tanh(logits / 30.0) * 30.0
        return F.cross_entropy(logits.float().view(-1, self.vocab), labels.view(-1))


class WithBias(_Head):
    """An LM head with a bias (BERT-style prediction heads, some ViT-GPT decoders)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=True)

    def forward(self, h, labels):
        return F.cross_entropy(self.lm_head(h).float().view(-1, self.vocab), labels.view(-1))


class ShiftedLogits(_Head):
    """transformers 4.x's causal-LM loss: ``logits[..., :-1, :].contiguous()`` against shifted labels."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, self.vocab), shift_labels.view(-1))


class NoUpcast(_Head):
    """The loss taken on the logits in the model's own dtype (no ``.float()``)."""

    def forward(self, h, labels):
        return F.cross_entropy(self.lm_head(h).view(-1, self.vocab), labels.view(-1))


STYLES = [LinearThenFloat, MatmulTransposedWeight, HiddenByVocabWeight, SumReduction, PerTokenLoss,
          LabelSmoothing, ZLoss, Softcapped, WithBias, ShiftedLogits, NoUpcast]


# ---- near-misses: must be left as written --------------------------------------------------------

class ReturnsLogits(_Head):
    """The logits are an output too (a Hugging Face model's forward returns them)."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1)), logits


class LogitsUsedForAccuracy(_Head):
    """The logits also feed an argmax (token accuracy)."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        loss = F.cross_entropy(logits.view(-1, self.vocab), labels.view(-1))
        return loss + (logits.argmax(-1) == labels).float().mean() * 0


class LogProbsUsedElsewhere(_Head):
    """The log-probabilities also feed an entropy bonus."""

    def forward(self, h, labels):
        logp = self.lm_head(h).float().view(-1, self.vocab).log_softmax(-1)
        nll = F.nll_loss(logp, labels.view(-1))
        return nll - 0.01 * (logp.exp() * logp).sum(-1).mean()


class ClassWeights(_Head):
    """Weighted cross-entropy: the fused loss computes the unweighted one."""

    def forward(self, h, labels):
        w = torch.linspace(0.5, 1.5, self.vocab, device=h.device)
        return F.cross_entropy(self.lm_head(h).float().view(-1, self.vocab), labels.view(-1), weight=w)


class SoftmaxOverTokens(_Head):
    """log_softmax over the token axis (a contrastive loss over positions), not the vocabulary."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float().view(-1, self.vocab)
        logp = logits.log_softmax(0)
        return F.nll_loss(logp, labels.view(-1))


class ShiftedScale(_Head):
    """A temperature that is a tensor (computed), not a constant."""

    def forward(self, h, labels):
        logits = self.lm_head(h).float()
        t = logits.detach().std()
        return F.cross_entropy((logits / t).view(-1, self.vocab), labels.view(-1))


NEAR_MISSES = {
    ReturnsLogits: "logits are used elsewhere",
    LogitsUsedForAccuracy: "logits are used elsewhere",
    LogProbsUsedElsewhere: "log-probabilities are also used",
    ClassWeights: "class weights",
    SoftmaxOverTokens: "not over the vocabulary",
    ShiftedScale: "not one the fused loss computes",
}
