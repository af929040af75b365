"""Attention variants (issue 12): attention sinks, sigmoid attention and per-row softmax temperatures
are each fused into one operator whose outputs and gradients (the sinks' and temperatures' learned
parameters included) match eager against a float64 reference, on the torch path and on the
interpreted Triton kernels; their near-misses are declined with their reasons."""
import re

import pytest
import torch

import fxfuse
from tests.attention_variant_styles import (SIGMOID_STYLES, SINK_STYLES, VARIANT_NEAR_MISSES, VARIANT_STYLES,
                                            RouterSoftmaxOverJoinedLogits, SigmoidGateMLP,
                                            StreamingLLMSinkTokens)
from tests.passes.test_attention_styles import PASSES, _check


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("style", VARIANT_STYLES, ids=lambda s: s.__name__)
def test_variant_is_fused_and_exact(style, dtype, cpu_path):
    res = _check(style, dtype)
    assert [m.kind for m in res.matches] == ["attention"], res.report()
    assert not res.misses, res.report()
    code = res.graph.code
    assert "fxfuse.attention" in code and "aten.bmm" not in code, code
    assert "aten._softmax" not in code and "aten.sigmoid" not in code and "aten.cat" not in code, code


@pytest.mark.parametrize("style", SINK_STYLES, ids=lambda s: s.__name__)
def test_sinks_enter_the_spec_as_one_column_input(style):
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.sinks >= 0 and spec.inputs[spec.sinks] == "sink", spec
    assert "sink" in spec.describe() and "slice" not in res.graph.code


@pytest.mark.parametrize("style", SIGMOID_STYLES, ids=lambda s: s.__name__)
def test_sigmoid_attention_has_no_softmax(style):
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.normalizer == "sigmoid" and "no row normalisation" in spec.describe(), spec
    source = res.kernels[0].source
    assert not re.search(r"\b(m_i|l_i|row_max|row_sum|delta)\b", source) and "STATS + " not in source, source


def test_streaming_llm_sink_tokens_become_an_index_mask():
    model = StreamingLLMSinkTokens()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    spec = res.matches[0].spec
    assert spec.inputs == () and any(s.expr is not None for s in spec.steps), spec.describe()


@pytest.mark.parametrize("style", VARIANT_NEAR_MISSES, ids=lambda s: s.__name__)
def test_variant_near_miss_is_declined_and_left_as_written(style):
    model = style()
    inputs = model.inputs(torch.float32)
    res = fxfuse.rewrite(model, tuple(inputs), passes=PASSES)
    assert not res.matches, res.report()
    assert [m.kind for m in res.misses] == ["attention"], res.report()
    assert style.reason in res.misses[0].reason, res.report()
    assert "fxfuse.attention" not in res.graph.code
    torch.testing.assert_close(res.module(*inputs), model(*inputs))


@pytest.mark.parametrize("style", [SigmoidGateMLP, RouterSoftmaxOverJoinedLogits], ids=lambda s: s.__name__)
def test_not_attention_is_not_looked_at(style):
    model = style()
    res = fxfuse.rewrite(model, tuple(model.inputs(torch.float32)), passes=PASSES)
    assert not res.matches and not res.misses, res.report()
