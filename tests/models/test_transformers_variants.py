"""Attention variants in transformers' own model code (issue 12), tiny configs, random weights:
gpt-oss (attention sinks: a learned logit per head joined to the scores, sliding-window and full
layers, grouped-query heads) and Llama 4's text model (inference-time temperature tuning: no-RoPE
layers scale q by ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` per query position).
Every attention layer is fused; logits, and a training step's gradients (the sinks' included), equal
eager by distance to a float64 copy, on the torch path and on the interpreted Triton kernels."""
import copy

import pytest
import torch

import fxfuse
from fxfuse.passes.attention import FuseAttention
from fxfuse.passes.canonicalize import Canonicalize
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")

PASSES = [Canonicalize(), FuseAttention()]
VOCAB = 64


def _gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                          max_position_embeddings=131072, use_cache=False, attn_implementation="eager")
    model = GptOssForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp = _DenseMLP(config.hidden_size)
    return model


class _DenseMLP(torch.nn.Module):
    """A dense stand-in for gpt-oss's mixture of experts, which has nothing to do with attention and
    cannot be tested here: its grouped_mm has no float64 (the reference copy), and its eager loop
    over the experts hit depends on tensor values (no whole-graph capture). Same return form."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        return torch.nn.functional.silu(self.proj(x)), None


def _llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    # no_rope_layers[i] is whether layer i uses RoPE: layer 0 has none, so it tunes its temperature.
    config = Llama4TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, intermediate_size_mlp=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              num_local_experts=2, no_rope_layers=[0, 1], attn_temperature_tuning=True, floor_scale=2,
                              attn_scale=0.1, max_position_embeddings=64, use_cache=False, attn_implementation="eager")
    return Llama4ForCausalLM(config)


BUILDERS = {"gpt_oss": _gpt_oss, "llama4": _llama4}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build().eval() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


def _rewrite(model, ids, **kwargs):
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"attention_mask": torch.ones_like(ids), **kwargs},
                         passes=PASSES)
    assert [m.kind for m in res.matches] == ["attention"] * 2, res.report()
    assert not res.misses, res.report()
    # The routers' softmax (gpt-oss) and sigmoid (Llama 4) over 2-D logits stay as written, silently.
    return res


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_layer_is_fused_and_logits_equal_eager(name, models, ids, cpu_path):
    model = models[name]
    res = _rewrite(model, ids)
    if name == "gpt_oss":
        assert all(m.spec.sinks >= 0 and m.spec.kv_groups == 2 for m in res.matches), res.report()
    kwargs = {"attention_mask": torch.ones_like(ids)}
    got, eager = res.module(ids, **kwargs).logits, model(ids, **kwargs).logits
    reference = copy.deepcopy(model).double()(ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, f"{name} logits")


def _train_step(model, run, ids):
    model.zero_grad()
    run(ids, labels=ids, attention_mask=torch.ones_like(ids)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gpt_oss_training_step_gives_eager_gradients_sinks_included(models, ids, cpu_path):
    model = copy.deepcopy(models["gpt_oss"]).train()
    res = _rewrite(model, ids, labels=ids)
    grads = _train_step(model, res.module, ids)
    eager = _train_step(model, model, ids)
    ref_model = copy.deepcopy(model).double()
    ref = _train_step(ref_model, ref_model, ids)
    assert set(grads) == set(eager) and any(n.endswith("sinks") for n in grads), sorted(grads)
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")
