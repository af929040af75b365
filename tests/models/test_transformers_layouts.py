"""Layouts in real model code nobody here wrote: Hugging Face ``transformers`` BERT with its default
(sdpa) attention and a padding attention_mask. SDPA's CPU kernel returns (B, L, H, D) memory order
and transformers merges the heads with ``transpose(1, 2).contiguous()`` (no copy there), then a
``view``: the claimed SDPA (with the guard a runtime mask needs) must give that layout too.
Tiny config, random weights, no downloads."""
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
