"""fxfuse.rewrite on Hugging Face models with their default cache (use_cache=True): the
DynamicCache in the output is taken apart into the graph's tensors and rebuilt, the rewritten
module returns what the model returns (the same output and cache classes, equal logits and cache
tensors), and a cache passed in (a decode step over a DynamicCache, a StaticCache) is read through
its tensors."""
import pytest
import torch

import fxfuse

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval(), config  # use_cache=True: the default


def _same_cache(got, want):
    assert type(got) is type(want) and len(got.layers) == len(want.layers)
    for a, b in zip(got.layers, want.layers):
        assert type(a) is type(b)
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-6)


@torch.no_grad()
def test_default_config_returns_the_dynamic_cache(llama):
    model, _ = llama
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    res = fxfuse.rewrite(model, (ids,))
    assert [m.kind for m in res.matches].count("attention") == 2, res.report()
    got, want = res.module(ids), model(ids)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert isinstance(got.past_key_values, DynamicCache)
    _same_cache(got.past_key_values, want.past_key_values)

    # A decode step reading that cache: one new token over the 7 cached positions.
    step = torch.randint(0, 64, (2, 1), generator=torch.Generator().manual_seed(1))
    passed, layer = got.past_key_values, got.past_key_values.layers[0]
    got_step = res.module(step, past_key_values=passed)
    want_step = model(step, past_key_values=want.past_key_values)
    torch.testing.assert_close(got_step.logits, want_step.logits, rtol=0, atol=1e-5)
    _same_cache(got_step.past_key_values, want_step.past_key_values)
    # As eager: the cache passed in is updated in place (its layers too) and is the one returned.
    assert want_step.past_key_values is want.past_key_values
    assert got_step.past_key_values is passed and passed.layers[0] is layer
    assert passed.get_seq_length() == want.past_key_values.get_seq_length() == 8
    # A second step through the same object, as a decode loop that ignores the output's cache runs.
    step2 = torch.randint(0, 64, (2, 1), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(res.module(step2, past_key_values=passed).logits,
                               model(step2, past_key_values=want.past_key_values).logits, rtol=0, atol=1e-5)
    _same_cache(passed, want.past_key_values)


@torch.no_grad()
def test_a_returned_cache_that_is_not_the_one_passed_in_leaves_it_alone():
    class FreshCache(torch.nn.Module):  # returns a new cache, the passed one untouched (as eager)
        def forward(self, x, past_key_values):
            fresh = DynamicCache()
            fresh.update(x * 2, x * 3, 0)
            return x + 1, fresh

    x = torch.randn(1, 2, 3, 4)
    passed = DynamicCache()
    passed.update(x, x, 0)
    res = fxfuse.rewrite(FreshCache(), (x, passed))
    out, fresh = res.module(x, passed)
    assert fresh is not passed and torch.equal(passed.layers[0].keys, x)
    torch.testing.assert_close(fresh.layers[0].keys, x * 2)


@torch.no_grad()
def test_a_static_cache_passed_in(llama):
    model, config = llama
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    res = fxfuse.rewrite(model, (ids,), example_kwargs={"past_key_values": StaticCache(config=config, max_cache_len=12)})
    got = res.module(ids, past_key_values=StaticCache(config=config, max_cache_len=12))
    want = model(ids, past_key_values=StaticCache(config=config, max_cache_len=12))
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    assert isinstance(got.past_key_values, StaticCache)
    _same_cache(got.past_key_values, want.past_key_values)
