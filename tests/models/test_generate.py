"""generate() with fxfuse: ``model.forward = torch.compile(model.forward, backend=...)`` on a tiny
random Llama, with the dynamic cache (DynamicCache: keys and values grow by torch.cat) and the
static cache (fixed buffers written in place, the unused tail hidden by the mask). Tokens equal
eager's greedy tokens, every graph Dynamo compiles has all its attention layers fused (prefill and
decode), and the number of graphs stays bounded: prefill, the first decode step, then one graph with
symbolic cache length for every later step (dynamic cache); prefill and one decode graph (static)."""
import pytest
import torch

from fxfuse.backend import Backend

pytest.importorskip("transformers")

LAYERS = 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("cache,max_graphs", [("dynamic", 3), ("static", 2)])
def test_generate_matches_eager_with_every_graph_fused(cache, max_graphs):
    model = _llama()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    want = model.generate(ids, **kwargs)
    be = Backend()
    model.forward = torch.compile(model.forward, backend=be)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert 1 < len(be.reports) <= max_graphs, [r.title for r in be.reports]
    for report in be.reports:
        assert len([m for m in report.matches if m.kind == "attention"]) == LAYERS, report.text()
        assert not [m for m in report.misses if m.kind == "attention"], report.text()
    decode = [m.shape for r in be.reports[1:] for m in r.matches if m.kind == "attention"]
    assert all("Lq 1" in s for s in decode), decode  # the decode steps' single query over the cache
    if cache == "dynamic":  # the later steps share one graph: the cache length is a symbol
        assert any("Lk s" in s for s in decode), decode
