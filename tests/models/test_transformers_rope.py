"""RoPE in real model code nobody here wrote: Hugging Face ``transformers``' Llama
(``apply_rotary_pos_emb``: rotate_half, cos/sin (B, L, D) from its rotary embedding, unsqueezed
onto the heads), eager and SDPA attention, from a tiny config with random weights. With fuse-rope
every layer's rotations go into the attention operator (the rope matches grow from none to one per
layer); logits and a training step's gradients equal eager (by distance to a float64 copy), on the
torch path and on the interpreted kernels, which rotate in their loads."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.attention_rope import FuseRope
from fxfuse.passes.canonicalize import Canonicalize
from fxfuse.passes.sdpa import ClaimSDPA
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")

LAYERS, VOCAB = 2, 64
WITHOUT = [Canonicalize(), ClaimSDPA(), FuseAttention()]
WITH = WITHOUT + [FuseRope()]


def _llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # head_dim 16: the kernels rotate in their loads (a power of two, at least 16)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _rope(res):
    return [m for m in res.matches if m.kind == "rope"]


def _train_step(model, run, ids):
    model.zero_grad()
    run(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_layer_rotation_is_fused_and_equals_eager(attn, cpu_path):
    model, ids = _llama(attn), _ids()
    before = fxfuse.rewrite(model, (ids,), passes=WITHOUT)
    res = fxfuse.rewrite(model, (ids,), passes=WITH)
    assert not _rope(before) and len(_rope(res)) == LAYERS, res.report()
    assert all(m.spec.rope_q == m.spec.rope_k == "half" for m in _rope(res)), res.report()
    # k read in place per kv head (repeat_kv's copy is not read), rotated in the operator's loads
    assert all(m.spec.kv_groups == 2 for m in _rope(res)), res.report()
    assert not [m for m in res.misses if m.kind == "rope"], res.report()
    # rotate_half's cat and neg for q and k of every layer are gone (the rotary embedding's own cat stays)
    cats = [r.graph.code.count("aten.cat.default") for r in (before, res)]
    assert cats[0] - cats[1] == 2 * LAYERS and "aten.neg" not in res.graph.code, res.graph.code
    reference = copy.deepcopy(model).double()
    assert_close_to_reference(res.module(ids).logits, model(ids).logits, reference(ids).logits, "logits")

    train = copy.deepcopy(model).train()
    res = fxfuse.rewrite(train, (ids,), example_kwargs={"labels": ids}, passes=WITH)
    assert len(_rope(res)) == LAYERS, res.report()
    grads, eager = _train_step(train, res.module, ids), _train_step(train, train, ids)
    ref_model = copy.deepcopy(train).double()
    ref = _train_step(ref_model, ref_model, ids)
    assert set(grads) == set(eager)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")


def test_rotated_keys_in_a_kv_cache_stay_as_written():
    """With a cache the rotated k is stored (torch.cat into DynamicCache) and attention reads the
    cache's cat, not the rotation: only q's rotation is fused; k's stays, computed once for the cache."""
    from transformers import DynamicCache

    model, ids = _llama("eager"), _ids()
    model.config.use_cache = True
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"past_key_values": DynamicCache(), "use_cache": True},
                         passes=WITH)
    specs = [m.spec for m in _rope(res)]
    assert len(specs) == LAYERS and all(s.rope_q == "half" and not s.rope_k for s in specs), res.report()
    assert res.graph.code.count("aten.neg") == LAYERS, res.graph.code  # rotate_half of each layer's k remains
    got, eager = res.module(ids, past_key_values=DynamicCache(), use_cache=True), model(ids, past_key_values=DynamicCache(),
                                                                                        use_cache=True)
    torch.testing.assert_close(got.logits, eager.logits)
    for layer in range(LAYERS):  # the cache holds the rotated keys, as eager's does
        torch.testing.assert_close(got.past_key_values.layers[layer].keys, eager.past_key_values.layers[layer].keys)


def test_qwen3_rotations_after_its_qk_norm_are_fused():
    """Qwen3 normalises q and k per head (RMSNorm over D) before RoPE: the rotations of the norms'
    outputs are fused, then fuse-qk-norm takes the norms (fxfuse.norm sites first) into the same
    operator (tests/models/test_transformers_qk_norm.py); logits equal eager."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         use_cache=False, attn_implementation="eager")
    model, ids = Qwen3ForCausalLM(config).eval(), _ids()
    res = fxfuse.rewrite(model, (ids,))  # the default pipeline: fuse-rope, then fuse-norm
    assert len(_rope(res)) == LAYERS and all(m.spec.rope_q == m.spec.rope_k == "half" for m in _rope(res)), \
        res.report()
    assert sum(m.kind == "rms_norm" for m in res.matches) == 2 * LAYERS + 2 * LAYERS + 1, res.report()
    assert sum(m.kind == "qk-norm" for m in res.matches) == LAYERS, res.report()
    reference = copy.deepcopy(model).double()
    assert_close_to_reference(res.module(ids).logits, model(ids).logits, reference(ids).logits, "logits")
