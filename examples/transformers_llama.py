"""A Hugging Face Llama compiled with ``backend="fxfuse"``, unchanged: its RMSNorms (and, with
``attn_implementation="eager"``, its hand-written attention) are found in the graph Dynamo captures.

A small Llama is built from a config (random weights, nothing downloaded), so this runs on CPU in
seconds. ``fxfuse.Backend()`` keeps one report per compiled graph, and ``backend.html(path)`` draws
them all on one page (a graph break gives several graphs).
"""
import os
import tempfile

import torch

try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ModuleNotFoundError:
    raise SystemExit("transformers_llama.py needs transformers: pip install -e '.[examples]' (or pip install transformers)")

import fxfuse


def make():
    """``(model, example_inputs, example_kwargs)``: also what ``fxfuse explain
    examples/transformers_llama.py:make`` runs (one capture, so without the KV cache object)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        attn_implementation="eager",  # the softmax(q k^T) v written out, as most research code does
    )
    model = LlamaForCausalLM(config).eval()
    return model, (torch.randint(0, config.vocab_size, (2, 16)),), {"use_cache": False}


def main():
    model, (input_ids,), _ = make()

    backend = fxfuse.Backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        logits = compiled(input_ids).logits
        expected = model(input_ids).logits

    for report in backend.reports:
        print(report.text())
        print()
    kinds = sorted({m.kind for r in backend.reports for m in r.matches})
    fused = sum(len(r.matches) for r in backend.reports)
    print(f"{len(backend.reports)} graph(s) compiled, {fused} site(s) fused ({', '.join(kinds) or 'none'})")

    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    print(f"logits equal eager (max abs difference {(logits - expected).abs().max().item():.2e})")

    path = os.path.join(tempfile.mkdtemp(prefix="fxfuse-"), "llama.html")
    backend.html(path)  # every compiled graph: its sites, kernels and pictures, one self-contained file
    print(f"HTML report: {path}")


if __name__ == "__main__":
    main()
