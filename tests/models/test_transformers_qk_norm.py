"""QK-norm in real model code nobody here wrote: Hugging Face ``transformers``' Qwen3 (RMSNorm over
each head's q and k, then RoPE) and Gemma3 (the same with ``1 + w``), from tiny configs with random
weights: with fuse-qk-norm every layer's q and k norms go into its attention operator (one
qk-norm match per layer, the per-head norm sites gone from the graph); logits and a training step's
gradients (q_norm/k_norm weights included) equal eager by distance to a float64 copy, on the torch
path and on the interpreted kernels, which normalise in their loads. OLMo2 normalises q and k over
the whole hidden before the heads are split: not per head, so those norms stay their own sites."""
import copy

import pytest
import torch

import fxfuse
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")

LAYERS, VOCAB = 2, 64
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_cache=False, attn_implementation="eager")


def _model(name: str):
    import transformers

    torch.manual_seed(0)
    config, cls = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                   "olmo2": ("Olmo2Config", "Olmo2ForCausalLM")}[name]
    model = getattr(transformers, cls)(getattr(transformers, config)(**SIZES)).eval()
    with torch.no_grad():  # random norm weights (they start at 1, or 0 for Gemma's 1 + w): the weights matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _qk(res):
    return [m for m in res.matches if m.kind == "qk-norm"]


def _train_step(model, run, ids):
    model.zero_grad()
    run(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_every_layer_qk_norm_is_fused_and_equals_eager(name, cpu_path):
    model, ids = _model(name), _ids()
    res = fxfuse.rewrite(model, (ids,))
    assert len(_qk(res)) == LAYERS and all(m.spec.norm_q and m.spec.norm_k for m in _qk(res)), res.report()
    assert all(m.spec.rope_q == m.spec.rope_k == "half" for m in _qk(res)), res.report()
    per_head = [n for n in res.graph.graph.nodes if n.target == torch.ops.fxfuse.norm.default and n.meta["val"].dim() == 4]
    assert not per_head, res.graph.code  # the q/k norms are inside the attention operators now
    reference = copy.deepcopy(model).double()
    assert_close_to_reference(res.module(ids).logits, model(ids).logits, reference(ids).logits, "logits")

    train = copy.deepcopy(model).train()
    res = fxfuse.rewrite(train, (ids,), example_kwargs={"labels": ids})
    assert len(_qk(res)) == LAYERS, res.report()
    grads, eager = _train_step(train, res.module, ids), _train_step(train, train, ids)
    ref_model = copy.deepcopy(train).double()
    ref = _train_step(ref_model, ref_model, ids)
    assert set(grads) == set(eager) and any("q_norm" in n for n in grads)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")


def test_olmo2_whole_hidden_norms_stay_their_own_sites():
    model, ids = _model("olmo2"), _ids()
    res = fxfuse.rewrite(model, (ids,))
    assert not _qk(res), res.report()
    misses = [m.reason for m in res.misses if m.kind == "qk-norm"]
    assert len(misses) == 2 * LAYERS and sum("whole hidden (64 = 4 heads x 16)" in r for r in misses) == sum("(32 = 2 heads x 16)" in r for r in misses) == LAYERS, res.report()
    reference = copy.deepcopy(model).double()
    assert_close_to_reference(res.module(ids).logits, model(ids).logits, reference(ids).logits, "logits")
