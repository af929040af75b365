"""Dropout on attention probabilities in training code: recognised where it is exactly dropout,
declined with its reason where it is not, and a training step with attention dropout of Hugging
Face GPT-2 (through ``fxfuse.rewrite`` and ``torch.compile(backend="fxfuse")``) and BERT: every
attention layer fused, and the loss and gradients equal to eager's with the fused operator's own
masks put in place of eager's dropout (the streams differ: the masks are drawn from the operator's
seeds)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fxfuse
from fxfuse.backend import Backend
from fxfuse.ops.attention import keep_mask
from tests.tolerances import assert_close_to_reference

B, H, L, D = 1, 2, 5, 8


def _scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))


class NnDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop(_scores(q, k).softmax(-1)) @ v


class FunctionalAfterCast(torch.nn.Module):  # GPT-2's order: softmax in f32, cast to v's dtype, dropout
    def forward(self, q, k, v):
        p = _scores(q, k).float().softmax(-1).to(v.dtype)
        return F.dropout(p, 0.1, training=self.training) @ v


FUSED = {
    "nn_dropout": NnDropout,
    "functional_after_cast": FunctionalAfterCast,
    "native_dropout": lambda: lambda q, k, v: torch.native_dropout(_scores(q, k).softmax(-1), 0.1, True)[0] @ v,
    # Another dropout upstream (on q) is left as written and does not make the scores "random".
    "dropout_upstream_too": lambda: lambda q, k, v: F.dropout(_scores(F.dropout(q, 0.2), k).softmax(-1), 0.1) @ v,
}


def _bernoulli_mask(p, keep=0.9):
    return torch.empty_like(p).bernoulli_(keep)


NEAR_MISSES = {  # name -> (function, words of the reason)
    "dropout_on_scores": (lambda q, k, v: F.dropout(_scores(q, k), 0.1).softmax(-1) @ v, "dropout on the scores"),
    "per_head_dropout2d": (lambda q, k, v: F.dropout2d(_scores(q, k).softmax(-1), 0.1) @ v, "shape [1, 2, 1, 1]"),
    "dropped_probabilities_returned": (
        lambda q, k, v: (lambda d: (d @ v, d))(F.dropout(_scores(q, k).softmax(-1), 0.1)), "also used"),
    "mask_returned": (lambda q, k, v: (lambda p, m: ((p * (m / 0.9)) @ v, m))(
        _scores(q, k).softmax(-1), _bernoulli_mask(torch.empty(B, H, L, L))), "dropout mask (bernoulli) is also used"),
    "wrong_rescale": (lambda q, k, v: (lambda p: (p * (_bernoulli_mask(p) / 0.8)) @ v)(_scores(q, k).softmax(-1)),
                      "divided by 0.8"),
}


def _qkv(dtype=torch.float32):
    return tuple(torch.randn(3, B, H, L, D, dtype=dtype).unbind(0))


@pytest.mark.parametrize("name", list(FUSED))
def test_dropout_on_the_probabilities_is_fused(name):
    model = FUSED[name]()
    dtype = torch.bfloat16 if name == "functional_after_cast" else torch.float32
    res = fxfuse.rewrite(model, _qkv(dtype))
    assert len(res.matches) == 1 and not res.misses, res.report()
    assert "dropout 0.1" in res.report()
    code = res.graph.code
    assert code.count("aten.bernoulli.p(") == (name == "dropout_upstream_too") and "native_dropout" not in code
    assert "softmax.default" not in code
    assert code.count("aten.randint.low(") == 1  # the operator's seed, drawn afresh each call


@pytest.mark.parametrize("name", ["nn_dropout", "functional_after_cast"])
def test_eval_mode_has_no_dropout_and_equals_eager(name):
    model = FUSED[name]().eval()
    qkv = _qkv()
    res = fxfuse.rewrite(model, qkv)
    assert len(res.matches) == 1 and res.matches[0].spec.dropout == 0.0
    assert "dropout" not in res.matches[0].describe() and "randint" not in res.graph.code
    torch.testing.assert_close(res.module(*qkv), model(*qkv))


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_random_multiplies_that_are_not_dropout_are_declined(name):
    fn, words = NEAR_MISSES[name]
    res = fxfuse.rewrite(fn, _qkv())
    assert not res.matches and len(res.misses) == 1 and words in res.misses[0].reason, res.report()


# ---- GPT-2 and BERT ---------------------------------------------------------------------------

pytest.importorskip("transformers")


def _gpt2(attention="eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.25,
                                      use_cache=False, attn_implementation=attention))


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.25, attn_implementation="eager"))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    # gpt2_sdpa: F.scaled_dot_product_attention(dropout_p=0.25), its math fallback on CPU.
    return {"gpt2": _gpt2().train(), "bert": _bert().train(), "gpt2_sdpa": _gpt2("sdpa").train()}


def _masks_of_fused_step(spec, seed, shape, layers, triton):
    """The masks the fused step drew: its graph draws one seed per layer, in order, from torch's
    generator; replaying those draws gives the seeds, and the seeds the masks (the kernels' own
    with ``triton``, else the torch path's)."""
    torch.manual_seed(seed)
    seeds = [torch.randint(0, 2**62, (), dtype=torch.int64) for _ in range(layers)]
    return [keep_mask(spec, s, shape, "cpu", triton=triton) for s in seeds]


def _step_with_masks(model, ids, masks):
    """The eager model, its attention dropout multiplying by the given masks instead of drawing."""
    masks, original = list(masks), F.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        if x.dim() == 4 and p > 0 and training:  # the attention probabilities (B, H, L, L)
            return x * (masks.pop(0).to(x.dtype) / (1 - p))
        return original(x, p, training, inplace)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        s = q @ k.transpose(-1, -2) * (q.size(-1) ** -0.5 if scale is None else scale)
        if is_causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        return dropout(s.softmax(-1), dropout_p) @ v

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "dropout", dropout)
        mp.setattr(F, "scaled_dot_product_attention", sdpa)
        return _step(model, model, ids)


def _step(model, run, ids):
    model.zero_grad()
    loss = run(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,entry", [("gpt2", "rewrite"), ("gpt2", "compile"), ("bert", "rewrite"),
                                        ("gpt2_sdpa", "rewrite"), ("gpt2", "rewrite_interpret")])
def test_training_step_with_attention_dropout(models, name, entry):
    # rewrite_interpret: the generated forward and backward kernels themselves, interpreted.
    model, interpret = copy.deepcopy(models[name]), entry == "rewrite_interpret"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    if entry.startswith("rewrite"):
        res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids}, options={"interpret": interpret})
        matches, run = res.matches, res.module
    else:
        backend = Backend()
        run = torch.compile(model, backend=backend)
        run(ids, labels=ids)  # compiles (and draws): the step below draws from a known state
        matches = backend.matches
    attention = [m for m in matches if m.kind == "attention"]
    assert len(attention) == 2 and all(m.spec.dropout == 0.25 for m in attention), [m.describe() for m in matches]
    torch.manual_seed(11)
    loss, grads = _step(model, run, ids)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    masks = _masks_of_fused_step(attention[0].spec, 11, (2, 2, 7, 7), layers=2, triton=interpret)
    dropped = sum(1 - m.float().mean().item() for m in masks) / 2
    assert abs(dropped - 0.25) < 5 * math.sqrt(0.25 * 0.75 / masks[0].numel())
    eager_loss, eager = _step_with_masks(model, ids, masks)
    wide = copy.deepcopy(model).double()
    ref_loss, ref = _step_with_masks(wide, ids, masks)
    assert_close_to_reference(loss, eager_loss, ref_loss, "loss")
    assert set(grads) == set(eager)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")
    # Another step draws other masks: another loss.
    assert not torch.equal(_step(model, run, ids)[0], loss)
