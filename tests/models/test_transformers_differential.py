"""Differential attention in transformers' DiffLlama (tiny config, random weights). DiffLlama writes
it as two attention calls sharing q and k over the two halves of v, then a chunk over the heads
(``o[:, :, :H/2] - lambda * o[:, :, H/2:]``): a form fuse-differential does not read (its halves are
not two fused outputs, see docs/limitations.md). So each call is fused on its own and the
combination stays as written; the point here is that the default pipeline, fuse-differential
included, leaves DiffLlama's logits and a training step's gradients (lambda's parameters included)
equal to eager by distance to a float64 copy."""
import copy

import pytest
import torch

import fxfuse
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")


def _diffllama():
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM

    config = DiffLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                             use_cache=False, attn_implementation="eager")
    return DiffLlamaForCausalLM(config)


def _step(model, ids):
    logits = model(ids).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (logits.double() * upstream).sum().backward()
    return logits, [p.grad for p in model.parameters()]


def test_diffllama_stays_exact_under_the_default_pipeline(cpu_path):
    torch.manual_seed(0)
    model = _diffllama()
    ids = torch.randint(0, 64, (2, 7))
    res = fxfuse.rewrite(model, (ids,))
    assert [m.kind for m in res.matches].count("attention") == 4, res.report()  # two calls per layer
    assert not [m for m in res.matches if m.kind == "differential"], res.report()
    expected, expected_grads = _step(copy.deepcopy(model).double(), ids)
    eager, eager_grads = _step(copy.deepcopy(model), ids)
    got, got_grads = _step(res.module, ids)
    assert_close_to_reference(got, eager, expected, "logits")
    names = [n for n, _ in model.named_parameters()]
    assert len(got_grads) == len(eager_grads) == len(names)
    for name, grad, e, r in zip(names, got_grads, eager_grads, expected_grads):
        assert grad is not None, name
        assert_close_to_reference(grad, e, r, name)
