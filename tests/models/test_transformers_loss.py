"""The LM head and its loss in real model code nobody here wrote: Hugging Face ``transformers``
Llama and GPT-2 (``ForCausalLMLoss``: ``logits.float()``, labels shifted by padding, mean over
non-ignored tokens; GPT-2's head is tied to its embedding) and Gemma 2 (final logit softcapping),
from tiny configs with random weights. A training step through the rewritten model must give
eager's loss and gradients (by distance to a float64 copy); when the model also returns its logits
the site is declined with the reason."""
import copy

import pytest
import torch
import transformers  # noqa: F401  (a test dependency)

import fxfuse
import fxfuse.ops.linear_cross_entropy as lce
from tests.models.test_transformers_norms import BUILDERS, VOCAB
from tests.tolerances import assert_close_to_reference

PASSES = "canonicalize,claim-sdpa,fuse-attention,fuse-norm,fuse-linear-cross-entropy"


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          final_logit_softcapping=30.0, use_cache=False, attn_implementation="eager")
    return Gemma2ForCausalLM(config)


MODELS = {"llama": lambda: BUILDERS["llama"]()[0], "gpt2": lambda: BUILDERS["gpt2"]()[0], "gemma2": _gemma2}


class LossOnly(torch.nn.Module):
    """What a training step differentiates: the loss alone (the logits are not kept)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels).loss


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 14 * 16)  # 16 of the 64 vocabulary columns per chunk


def _batch():
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :3] = -100  # a prompt that is not trained on
    return ids, labels


def _step(model, ids, labels):
    model.zero_grad()
    loss = model(ids, labels)
    loss.backward()
    return loss, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_equals_eager(name, dtype):
    torch.manual_seed(0)
    model = LossOnly(MODELS[name]().to(dtype).train())
    ids, labels = _batch()
    res = fxfuse.rewrite(model, (ids, labels), passes=PASSES)
    assert [m.kind for m in res.matches].count("linear_cross_entropy") == 1, res.report()
    assert "aten._log_softmax" not in res.graph.code
    got, got_grads = _step(res.module, ids, labels)
    eager, eager_grads = _step(model, ids, labels)
    expected, expected_grads = _step(copy.deepcopy(model).double(), ids, labels)
    assert_close_to_reference(got, eager, expected, f"{name} loss")
    for g, e, r in zip(got_grads, eager_grads, expected_grads):
        assert_close_to_reference(g, e, r, f"{name} gradient")


def test_gemma2_softcap_is_in_the_spec():
    model = LossOnly(_gemma2())
    res = fxfuse.rewrite(model, _batch(), passes=PASSES)
    spec = next(m.spec for m in res.matches if m.kind == "linear_cross_entropy")
    assert [(s.op, s.value) for s in spec.steps if s.op != "cast"] == [("div", 30.0), ("tanh", 0.0), ("mul", 30.0)]


def test_model_returning_its_logits_is_declined():
    model = MODELS["llama"]()
    ids, labels = _batch()
    res = fxfuse.rewrite(lambda i, l: model(input_ids=i, labels=l), (ids, labels), passes=PASSES)
    assert "linear_cross_entropy" not in [m.kind for m in res.matches]
    reasons = [m.reason for m in res.misses if m.kind == "linear_cross_entropy"]
    assert reasons and "logits are used elsewhere" in reasons[0] and ".loss" in reasons[0]
    out = res.module(ids, labels)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=labels).loss)


def test_torch_compile_training_step():
    torch.manual_seed(0)
    model = LossOnly(MODELS["llama"]().train())
    ids, labels = _batch()
    backend = fxfuse.Backend(passes=PASSES)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got, got_grads = _step(compiled, ids, labels)
    eager, eager_grads = _step(model, ids, labels)
    assert "linear_cross_entropy" in [m.kind for m in backend.matches], backend.report()
    torch.testing.assert_close(got, eager)
    for g, e in zip(got_grads, eager_grads):
        torch.testing.assert_close(g, e)
