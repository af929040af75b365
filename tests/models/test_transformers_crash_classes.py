"""Classes of crashes found in real model code nobody here wrote (Hugging Face ``transformers``,
tiny configs, random weights, no downloads):

- BERT with its default (sdpa) attention and a padding attention_mask: SDPA's CPU kernel returns
  (B, L, H, D) memory order and transformers merges the heads with ``transpose(1, 2).contiguous()``
  (no copy there), then a ``view``: the claimed SDPA (with the guard a runtime mask needs) must give
  that layout too;
- DeepSeek-V3 attention assembles its keys with ``new_empty`` and slice ``copy_``: the rewritten
  model must train (functionalization's ``aten.copy`` has no derivative)."""
import torch
import transformers  # a test dependency (pyproject's [test] extra)

import fxfuse
from tests.tolerances import assert_close_to_reference


def _bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # the second sequence is padded
    return model, {"input_ids": ids, "attention_mask": mask, "return_dict": False}


def test_bert_with_padding_mask_runs_rewritten_and_compiled():
    model, kwargs = _bert()
    expected = model.double()(**kwargs)[0]
    model.float()
    eager = model(**kwargs)[0]
    res = fxfuse.rewrite(model, (), example_kwargs=kwargs)
    assert sum(m.kind == "attention" for m in res.matches) == 2, res.report()
    assert_close_to_reference(res.module(**kwargs)[0], eager, expected, "rewritten output")
    compiled = torch.compile(model, backend="fxfuse")
    out = compiled(**kwargs)[0]
    assert_close_to_reference(out, eager, expected, "compiled output")
    out.sum().backward()  # the compiled backward runs (AOTAutograd planned it on the fake layouts)
    assert all(p.grad is not None for p in model.encoder.layer[0].attention.self.query.parameters())


def test_deepseek_v3_trains_rewritten_and_compiled():
    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32, use_cache=False, attn_implementation="eager")
    model = transformers.DeepseekV3ForCausalLM(config).train()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    kwargs = {"input_ids": ids, "return_dict": False}
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(**kwargs)[0]
    eager_grads = torch.autograd.grad(eager.sum(), params, allow_unused=True)
    res = fxfuse.rewrite(model, (), example_kwargs=kwargs)
    assert any(m.kind == "attention" for m in res.matches), res.report()
    for run in (res.module, torch.compile(model, backend="fxfuse")):
        out = run(**kwargs)[0]
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), params, allow_unused=True)
        for g, e in zip(grads, eager_grads):
            assert (g is None) == (e is None)
            if g is not None:
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
