"""What benchmarks/model_sweep.py found in transformers families (tiny configs, random weights, no
downloads), one test per class:

- GPT-Neo fills masked scores with ``torch.where(mask, scores, torch.tensor(finfo.min))``: a 0-d
  tensor built in forward, which the captured graph holds as a constant (lift_fresh_copy of a
  get_attr). Its value is fixed, so the fill is read from it; a 0-d fill that is a graph input
  (its value may change between calls) is not a constant and must not be read."""
import torch
import transformers  # a test dependency (pyproject's [test] extra)

import fxfuse
from tests.tolerances import assert_close_to_reference


def _gpt_neo():
    config = transformers.GPTNeoConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_position_embeddings=32,
        attention_types=[[["global", "local"], 1]], window_size=4, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0, use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(config).eval()


def test_gpt_neo_tensor_fill_fuses_global_and_local_attention():
    model = _gpt_neo()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, "return_dict": False}
    with torch.no_grad():
        expected = model.double()(**kwargs)[0]
        model.float()
        eager = model(**kwargs)[0]
    res = fxfuse.rewrite(model, (), example_kwargs=kwargs)
    assert sum(m.kind == "attention" for m in res.matches) == 2, res.report()
    with torch.no_grad():
        assert_close_to_reference(res.module(**kwargs)[0], eager, expected, "GPT-Neo logits")
    grads = torch.autograd.grad(res.module(**kwargs)[0].sum(), list(model.parameters()))
    eager_grads = torch.autograd.grad(model(**kwargs)[0].sum(), list(model.parameters()))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


class _TensorFill(torch.nn.Module):
    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-1, -2) / 4.0
        s = torch.where(mask, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        return s.softmax(-1) @ v


class _InputFill(torch.nn.Module):
    def forward(self, q, k, v, mask, fill):
        s = q @ k.transpose(-1, -2) / 4.0
        return torch.where(mask, s, fill).softmax(-1) @ v


def _qkv_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.3
    mask[..., 0] = True  # no fully masked row
    return q, k, v, mask


def test_constant_tensor_fill_is_read_and_an_input_fill_is_not():
    q, k, v, mask = _qkv_mask()
    model = _TensorFill()
    res = fxfuse.rewrite(model, (q, k, v, mask))
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    expected = model(q.double(), k.double(), v.double(), mask)
    assert_close_to_reference(res.module(q, k, v, mask), model(q, k, v, mask), expected, "tensor fill")

    fill = torch.tensor(-1e9)
    res = fxfuse.rewrite(_InputFill(), (q, k, v, mask, fill))
    assert not [m for m in res.matches if m.kind == "attention"], res.report()
    other = torch.tensor(5.0)  # another call's fill: the graph must use it, not the captured value
    torch.testing.assert_close(res.module(q, k, v, mask, other), _InputFill()(q, k, v, mask, other))
