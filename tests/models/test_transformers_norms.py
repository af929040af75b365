"""Norms in real model code nobody here wrote: Hugging Face ``transformers`` Llama (LlamaRMSNorm),
T5 (T5LayerNorm: float32 statistics of a half-precision input), GPT-2 and BERT (nn.LayerNorm).

Each model is built from a tiny config with random weights (no downloads). Every norm layer must
be matched with the right kind, and the rewritten model must give eager's logits (compared by
distance to a float64 copy, tests/tolerances.py), eager's gradients in a training step, and the
same through ``torch.compile(backend="fxfuse")`` and through the interpreted Triton kernels.
"""
import copy

import pytest
import torch
import transformers  # a test dependency (pyproject's [test] extra): a missing install fails, not skips

import fxfuse
from tests.tolerances import assert_close_to_reference

VOCAB, SEQ = 64, 8
# The logits test runs the default pipeline (the whole product, attention fusion included); the
# others pin the norm pipeline so that what they measure is the norms alone.
NORM_PASSES = "canonicalize,fuse-norm"


def _randomize_norms(model: torch.nn.Module, norm_type: type) -> torch.nn.Module:
    # Norm weights start at ones (and biases at zeros); random values make a weight that the
    # rewrite dropped or applied twice show up in the logits and gradients.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norm_type):
                for p in m.parameters():
                    p.normal_(1.0, 0.5)
    return model.eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         use_cache=False, attn_implementation="eager")
    return LlamaForCausalLM(config), LlamaRMSNorm, "rms_norm"


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                      use_cache=False, attn_implementation="eager")
    return T5ForConditionalGeneration(config), T5LayerNorm, "rms_norm"


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        attn_implementation="eager")
    return GPT2LMHeadModel(config), torch.nn.LayerNorm, "layer_norm"


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForMaskedLM(config), torch.nn.LayerNorm, "layer_norm"


BUILDERS = {"llama": _llama, "t5": _t5, "gpt2": _gpt2, "bert": _bert}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    built = {}
    for name, build in BUILDERS.items():
        model, norm_type, kind = build()
        built[name] = (_randomize_norms(model, norm_type), norm_type, kind)
    return built


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _kwargs(name, ids):
    if name == "t5":
        return {"decoder_input_ids": ids}
    if name in ("llama", "gpt2"):
        # An explicit attention mask, as real callers pass: without one (and without a cache) they
        # check position_ids for packed sequences with a data-dependent `if`, which cannot be captured.
        return {"attention_mask": torch.ones_like(ids)}
    return {}


NORM_KINDS = ("rms_norm", "layer_norm")


def _norm_matches(res):
    """The norm sites of a rewrite (the default pipeline fuses attention too)."""
    return [m for m in res.matches if m.kind in NORM_KINDS]


def _norm_misses(res):
    return [m for m in res.misses if any(k in m.kind for k in NORM_KINDS)]


def _count_norms(model, norm_type) -> int:
    return sum(isinstance(m, norm_type) for m in model.modules())


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_norm_layer_is_matched_and_logits_equal_eager(name, models, input_ids):
    model, norm_type, kind = models[name]
    kwargs = _kwargs(name, input_ids)
    res = fxfuse.rewrite(model, (input_ids,), example_kwargs=kwargs)
    expected_norms = _count_norms(model, norm_type)
    assert expected_norms >= 5  # 2 layers x 2 (T5's decoder: x 3) plus final norms
    assert [m.kind for m in _norm_matches(res)] == [kind] * expected_norms, res.report()
    assert not _norm_misses(res), res.report()
    assert all(m.source != "<unknown>" for m in _norm_matches(res)), res.report()
    got = res.module(input_ids, **kwargs).logits
    eager = model(input_ids, **kwargs).logits
    reference = copy.deepcopy(model).double()(input_ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, f"{name} logits")


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_bf16_logits(name, models, input_ids):
    # Llama upcasts to float32 and casts back before its weight; T5 takes float32 statistics of the
    # bf16 input and multiplies the bf16 input by a float32 rsqrt, then casts to the weight's dtype.
    model = copy.deepcopy(models[name][0]).to(torch.bfloat16)
    kwargs = _kwargs(name, input_ids)
    res = fxfuse.rewrite(model, (input_ids,), example_kwargs=kwargs, passes=NORM_PASSES)
    specs = [m.spec for m in _norm_matches(res)]
    assert len(specs) == _count_norms(model, models[name][1]), res.report()
    assert all(s.compute_dtype == "float32" and s.out_dtype == "bfloat16" for s in specs), res.report()
    if name == "llama":
        # The norms after a residual add fold it in, except the final norm, whose sum is read only by
        # the norm's own upcast: there is nothing to share.
        assert [s.residual for s in specs] == [False, True, True, True, False], res.report()
    got = res.module(input_ids, **kwargs).logits
    eager = model(input_ids, **kwargs).logits
    reference = copy.deepcopy(models[name][0]).double()(input_ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, f"{name} bf16 logits")


def _train_step(model, input_ids, run, kwargs):
    model.zero_grad()
    out = run(input_ids, labels=input_ids, **kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_training_step_gives_eager_norm_gradients(name, models, input_ids):
    model, norm_type, _ = models[name]
    model = copy.deepcopy(model).train()
    kwargs = _kwargs(name, input_ids)
    res = fxfuse.rewrite(model, (input_ids,), example_kwargs={"labels": input_ids, **kwargs},
                         passes=NORM_PASSES)
    assert len(_norm_matches(res)) == _count_norms(model, norm_type), res.report()
    loss, grads = _train_step(model, input_ids, res.module, kwargs)
    eager_loss, eager_grads = _train_step(model, input_ids, model, kwargs)
    ref_model = copy.deepcopy(model).double()
    ref_loss, ref_grads = _train_step(ref_model, input_ids, ref_model, kwargs)
    assert_close_to_reference(loss, eager_loss, ref_loss, "loss")
    norm_params = [f"{module_name}.{param_name}" for module_name, m in model.named_modules()
                   if isinstance(m, norm_type) for param_name, _ in m.named_parameters()]
    assert norm_params and set(norm_params) <= set(grads)
    for n in norm_params:
        assert grads[n].abs().sum() > 0, n
        assert_close_to_reference(grads[n], eager_grads[n], ref_grads[n], f"gradient of {n}")


def test_torch_compile_llama_matches_eager(models, input_ids, monkeypatch):
    import fxfuse.ops.norm as norm_ops

    calls = []
    reference_norm = norm_ops.reference
    monkeypatch.setattr(norm_ops, "reference", lambda *args: calls.append(1) or reference_norm(*args))
    model, kwargs = models["llama"][0], _kwargs("llama", input_ids)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="fxfuse", options={"passes": NORM_PASSES})
        got = compiled(input_ids, **kwargs).logits
    finally:
        torch._dynamo.reset()
    assert len(calls) == 5  # the compiled forward ran the five fused norms (on their CPU path)
    eager = model(input_ids, **kwargs).logits
    reference = copy.deepcopy(model).double()(input_ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, "compiled llama logits")


def test_llama_on_interpreted_triton_kernels(models, input_ids, monkeypatch):
    # The kernels themselves (forward and backward), run by Triton's interpreter; kept tiny.
    from fxfuse.runtime import norm as kernels

    launches = {"forward": 0, "backward": 0}
    for direction in launches:
        def counted(*args, _launch=getattr(kernels, direction), _direction=direction):
            launches[_direction] += 1
            return _launch(*args)
        monkeypatch.setattr(kernels, direction, counted)
    model = copy.deepcopy(models["llama"][0]).train()
    ids = input_ids[:1, :4]
    with fxfuse.config.patch(interpret=True):
        res = fxfuse.rewrite(model, (ids,), example_kwargs={"labels": ids, **_kwargs("llama", ids)},
                             passes=NORM_PASSES)
        loss, grads = _train_step(model, ids, res.module, _kwargs("llama", ids))
    assert len(_norm_matches(res)) == 5
    assert launches == {"forward": 5, "backward": 5}
    eager_loss, eager_grads = _train_step(model, ids, model, _kwargs("llama", ids))
    ref_model = copy.deepcopy(model).double()
    ref_loss, ref_grads = _train_step(ref_model, ids, ref_model, _kwargs("llama", ids))
    assert_close_to_reference(loss, eager_loss, ref_loss, "loss")
    for n, g in grads.items():
        if "norm" in n:
            assert_close_to_reference(g, eager_grads[n], ref_grads[n], f"gradient of {n}")


# More architectures, each a different way of writing the norm: Gemma's (1 + w) in float32, Gemma2's
# pre- and post-norms, Qwen3's RMSNorm over each attention head's q and k, Cohere's hand-written
# float32 LayerNorm without bias, OLMo's LayerNorm without parameters, Phi's nn.LayerNorm.
MORE = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
}


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_architectures_every_norm_matched(name, input_ids):
    config_cls, model_cls, extra = MORE[name]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="eager",
        pad_token_id=0, bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    norm_types = tuple({type(m) for m in model.modules() if "Norm" in type(m).__name__})
    model = _randomize_norms(model, norm_types)
    kwargs = {"attention_mask": torch.ones_like(input_ids)}
    res = fxfuse.rewrite(model, (input_ids,), example_kwargs=kwargs, passes=NORM_PASSES)
    assert len(res.matches) == _count_norms(model, norm_types) >= 3, res.report()
    assert not res.misses, res.report()
    got, eager = res.module(input_ids, **kwargs).logits, model(input_ids, **kwargs).logits
    reference = copy.deepcopy(model).double()(input_ids, **kwargs).logits
    assert_close_to_reference(got, eager, reference, f"{name} logits")
