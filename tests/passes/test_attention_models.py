"""Attention in real model code nobody here wrote: the eager attention of Hugging Face
``transformers``' GPT-2 (causal + padding as one additive mask), Llama (GQA through repeat_kv,
causal mask), BERT (no mask: see _kwargs), T5 (relative position bias, no scale) and BLOOM
(``alibi.baddbmm(q, k^T, alpha=1/sqrt(d))``, then causal + padding mask), from tiny
configs with random weights. Every attention layer must be fused, and logits and a training step's
gradients must equal eager (by distance to a float64 copy)."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.canonicalize import Canonicalize
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")
from tests.models.test_transformers_norms import BUILDERS, VOCAB  # noqa: E402  (the same tiny configs)

PASSES = [Canonicalize(), FuseAttention()]
# T5: 2 encoder, 2 decoder self, 2 cross
ATTENTION_LAYERS = {"gpt2": 2, "llama": 2, "bert": 2, "t5": 6, "bloom": 2}


class _PlainBloomGelu(torch.nn.Module):
    """BLOOM's GeLU without its torch.autograd.Function: the capture traces such a Function's
    forward with grad mode off and cuts the gradient there (the MLP weights would get none), a
    capture limitation that has nothing to do with attention; the values are the same ops."""

    def forward(self, x):
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

        return bloom_gelu_forward(x)


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0,
                         attention_dropout=0.0, use_cache=False, attn_implementation="eager")
    model = BloomForCausalLM(config)
    for block in model.transformer.h:
        block.mlp.gelu_impl = _PlainBloomGelu()
    return model, torch.nn.LayerNorm, "layer_norm"


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build()[0].eval() for name, build in {**BUILDERS, "bloom": _bloom}.items()}


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second sequence: the mask is not all ones
    return ids, mask


def _kwargs(name, ids, mask):
    if name == "t5":
        return {"decoder_input_ids": ids}
    if name == "gpt2":
        return {"attention_mask": mask}
    if name == "bloom":
        # Right padding: BLOOM's float64 copy (the reference) fills hidden scores with float64's
        # min, which its float32 softmax turns into -inf, so a left-padded row that hides every
        # key is NaN there; with right padding every query still sees key 0.
        return {"attention_mask": mask.flip(-1)}
    # Llama's and BERT's mask builders branch on the mask's values (`padding_mask.all()`), which
    # cannot be captured whole; an all-ones mask (Llama) or none (BERT) is what they can take here.
    return {"attention_mask": torch.ones_like(ids)} if name == "llama" else {}


@pytest.mark.parametrize("name", sorted(ATTENTION_LAYERS))
def test_every_attention_layer_is_fused_and_logits_equal_eager(name, models, batch):
    model, (ids, mask) = models[name], batch
    kwargs = _kwargs(name, ids, mask)
    res = fxfuse.rewrite(model, (ids,), example_kwargs=kwargs, passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] * ATTENTION_LAYERS[name], res.report()
    assert not res.misses, res.report()
    assert "softmax.default" not in res.graph.code
    # Each model merges the heads right after attention: the operator writes that layout, so the
    # merge is a view (tests/passes/test_attention_head_merge.py), and the logits below still agree.
    fused = [n for n in res.graph.graph.nodes if n.target == torch.ops.fxfuse.attention.default]
    assert all(n.args[5:] == (None, True) for n in fused), res.graph.code
    if name == "llama":  # 4 query heads share 2 kv heads: repeat_kv's copies are read in place instead
        assert all(m.spec.kv_groups == 2 for m in res.matches), res.report()
        # The report gives each site's sizes, the head grouping as query heads → kv heads.
        assert all(m.shape == "B 2, H 4, GQA 4→2, L 7, D 8" for m in res.matches), res.report()
        assert "(B 2, H 4, GQA 4→2, L 7, D 8) -> kernel fxfuse_attention_" in res.report()
    if name == "bloom":  # baddbmm: its alpha and its ALiBi bias are the first steps, then the mask
        assert "baddbmm" not in res.graph.code
        assert all([s.op for s in m.spec.steps] == ["mul", "add", "add"] for m in res.matches), res.report()
    got = res.module(ids, **kwargs).logits
    eager = model(ids, **kwargs).logits
    reference = copy.deepcopy(model).double()(ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, f"{name} logits")


def _train_step(model, run, ids, kwargs):
    model.zero_grad()
    run(ids, labels=ids, **kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["gpt2", "t5", "bloom"])
def test_training_step_gives_eager_gradients(name, models, batch):
    # T5's relative position bias is a parameter: its gradient flows through the fused operator.
    model = copy.deepcopy(models[name]).train()
    ids, mask = batch
    kwargs = _kwargs(name, ids, mask)
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids, **kwargs}, passes=PASSES)
    assert len(res.matches) == ATTENTION_LAYERS[name], res.report()
    grads = _train_step(model, res.module, ids, kwargs)
    eager = _train_step(model, model, ids, kwargs)
    ref_model = copy.deepcopy(model).double()
    ref = _train_step(ref_model, ref_model, ids, kwargs)
    assert set(grads) == set(eager)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")
    if name == "t5":
        assert any("relative_attention_bias" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_gpt2_training_step_on_the_interpreted_kernels(models, batch, monkeypatch):
    # The generated forward and backward kernels themselves (GPT-2's additive mask needs no
    # gradient, so the backward runs the kernels, not the torch formula).
    import fxfuse.runtime.attention as kernels

    launches = {"forward": 0, "backward": 0}
    for direction in launches:
        def counted(*args, _launch=getattr(kernels, direction), _direction=direction, **kwargs):
            launches[_direction] += 1
            return _launch(*args, **kwargs)
        monkeypatch.setattr(kernels, direction, counted)
    model = copy.deepcopy(models["gpt2"]).train()
    ids, mask = batch
    kwargs = {"attention_mask": mask}
    with fxfuse.config.patch(interpret=True):
        res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids, **kwargs}, passes=PASSES)
        grads = _train_step(model, res.module, ids, kwargs)
    assert len(res.matches) == 2
    assert launches["backward"] == 2 and launches["forward"] == 4  # 2 forward + 2 recomputed in backward
    eager = _train_step(model, model, ids, kwargs)
    ref_model = copy.deepcopy(model).double()
    ref = _train_step(ref_model, ref_model, ids, kwargs)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")
