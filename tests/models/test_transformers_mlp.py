"""Gated MLPs in real model code nobody here wrote: Hugging Face ``transformers`` Llama (SwiGLU,
separate gate/up projections), Phi-3 (one ``gate_up_proj`` split with ``chunk``) and Gemma (GeGLU
with tanh GELU), tiny configs with random weights. Every MLP layer is fused and a training step's
loss and gradients are eager's, bitwise (the operator runs eager's own ops)."""
import pytest
import torch
import transformers  # noqa: F401  (a test dependency)

import fxfuse
from tests.models.test_transformers_norms import BUILDERS, VOCAB

PASSES = "canonicalize,fuse-gated-mlp"
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="eager")


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                                      pad_token_id=0, bos_token_id=0, eos_token_id=0))


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=8, hidden_activation="gelu_pytorch_tanh"))


MODELS = {"llama": lambda: BUILDERS["llama"]()[0], "phi3": _phi3, "gemma": _gemma}
ACT = {"llama": "silu", "phi3": "silu", "gemma": "gelu_tanh"}


class LossOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels):
        return self.model(input_ids=ids, labels=labels).loss


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_is_eager_bitwise(name):
    torch.manual_seed(0)
    model = LossOnly(MODELS[name]().train())
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    res = fxfuse.rewrite(model, (ids, ids), passes=PASSES)
    assert [(m.kind, m.spec.act) for m in res.matches] == [("gated_mlp", ACT[name])] * 2, res.report()
    grads = []
    for m in (res.module, model):
        model.zero_grad()
        loss = m(ids, ids)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (got, got_g), (eager, eager_g) = grads
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    for g, e in zip(got_g, eager_g):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
