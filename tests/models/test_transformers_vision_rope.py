"""RoPE in the vision towers of transformers' Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V (code nobody here wrote;
tiny configs, random weights): ``apply_rotary_pos_emb_vision`` rotates (L, H, D) q and k in
float32, then eager and SDPA attention split q, k and v per image with
``torch.split(x, lengths.tolist(), dim=2)``. With one image the split's one chunk is the whole
tensor: fxfuse reads the tensor (the size check kept as a runtime assert) and fuses the rotation
into the attention of every layer. With two images each chunk's length is read from data: the
attention is left as written with the reason, and the output stays eager's. The towers' own
data-dependent set-up (cu_seqlens, position ids, window index) is passed precomputed, as
transformers' vision_utils allows, so the whole tower is captured."""
import copy

import pytest
import torch

import fxfuse
from tests.tolerances import assert_close_to_reference

pytest.importorskip("transformers")

DEPTH, PATCH = 2, 2
GRID = [1, 4, 4]  # one image: 16 patches of 3 x 2 x 2


def _tower(family: str, attn: str, dtype: torch.dtype):
    torch.manual_seed(0)
    common = dict(depth=DEPTH, hidden_size=64, num_heads=4, in_channels=3, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=1)  # head dim 16: the kernels rotate in their loads
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VisionTransformerPretrainedModel as Tower,
                                                                    Qwen2VLVisionConfig as Config)
        config = Config(embed_dim=64, mlp_ratio=2, **common)
    elif family == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig as Config, Qwen3VLVisionModel as Tower
        config = Config(intermediate_size=64, out_hidden_size=64, num_position_embeddings=16,
                        deepstack_visual_indexes=[1], **common)
    elif family == "glm4v":
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionConfig as Config, Glm4vVisionModel as Tower
        config = Config(intermediate_size=64, out_hidden_size=64, image_size=GRID[1] * PATCH, **common)
    else:  # window attention in the blocks not in fullatt_block_indexes; one window spans an image here
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower, Qwen2_5_VLVisionConfig as Config)
        config = Config(intermediate_size=64, out_hidden_size=64, window_size=GRID[1] * PATCH,
                        fullatt_block_indexes=[1], **common)
    config._attn_implementation = attn
    return Tower(config).to(dtype).eval()


def _inputs(model, images: int, dtype: torch.dtype):
    """(pixel patches, grid_thw) and the precomputed kwargs the tower would compute from data."""
    from transformers import vision_utils as vu

    grid = torch.tensor([GRID] * images)
    x = torch.randn(images * GRID[1] * GRID[2], 3 * PATCH * PATCH, generator=torch.Generator().manual_seed(1))
    kwargs = {"cu_seqlens": vu.get_vision_attention_seqlens(grid, model.config)[0],
              "position_ids": vu.get_vision_position_ids(grid, model.spatial_merge_size)}
    if hasattr(model, "num_grid_per_side"):  # Qwen3-VL's interpolated position embeddings
        kwargs["interp_indices"], kwargs["interp_weights"] = vu.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=model.num_grid_per_side, mode=model.interpolation_mode,
            align_corners=model.interpolation_align_corners, spatial_merge_size=model.config.spatial_merge_size)
    if hasattr(model, "fullatt_block_indexes"):
        kwargs["window_index"], kwargs["cu_window_seqlens"] = vu.get_vision_window_index(
            grid, model.spatial_merge_size, model.window_size, model.patch_size)
    return x.to(dtype), grid, kwargs


def _kinds(res, kind):
    return [m for m in res.matches if m.kind == kind]


def _reference(model, x, grid, kwargs):
    return copy.deepcopy(model).double()(x.double(), grid, **kwargs).last_hidden_state


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_one_image_every_layer_rotation_is_fused(family, attn, dtype):
    model = _tower(family, attn, dtype)
    x, grid, kwargs = _inputs(model, 1, dtype)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    rope = _kinds(res, "rope")
    # a 16-bit q/k is rotated in float32 and rounded once (in float32 the casts are no-ops)
    style = "half/float32" if dtype == torch.bfloat16 else "half"
    assert len(rope) == DEPTH and all(m.spec.rope_q == m.spec.rope_k == style for m in rope), res.report()
    assert not res.misses, res.report()
    assert "split_with_sizes" not in res.graph.code and "aten.neg" not in res.graph.code, res.graph.code
    assert res.graph.code.count("aten._assert_scalar") == 3 * DEPTH  # q's, k's and v's split sizes, checked
    out = res.module(x, grid, **kwargs).last_hidden_state
    eager = model(x, grid, **kwargs).last_hidden_state
    assert_close_to_reference(out, eager, _reference(model, x, grid, kwargs), "last_hidden_state")


@pytest.mark.parametrize("family", ["qwen3_vl", "glm4v"])
def test_one_image_in_other_families_towers(family):
    """Qwen3-VL (interpolated position embeddings, deepstack mergers) and GLM-4V (RMSNorm blocks)
    copy Qwen2-VL's vision attention: every layer's rotation is fused there too."""
    model = _tower(family, "sdpa", torch.bfloat16)
    x, grid, kwargs = _inputs(model, 1, torch.bfloat16)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    rope = _kinds(res, "rope")
    assert len(rope) == DEPTH and all(m.spec.rope_q == "half/float32" for m in rope), res.report()
    assert not res.misses, res.report()
    out = res.module(x, grid, **kwargs).last_hidden_state
    eager = model(x, grid, **kwargs).last_hidden_state
    assert_close_to_reference(out, eager, _reference(model, x, grid, kwargs), "last_hidden_state")


def test_one_image_on_the_interpreted_kernels(cpu_path):
    model = _tower("qwen2_vl", "sdpa", torch.bfloat16)
    x, grid, kwargs = _inputs(model, 1, torch.bfloat16)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    assert len(_kinds(res, "rope")) == DEPTH, res.report()
    out = res.module(x, grid, **kwargs).last_hidden_state
    eager = model(x, grid, **kwargs).last_hidden_state
    assert_close_to_reference(out, eager, _reference(model, x, grid, kwargs), "last_hidden_state")


def _grads(model, run, x, grid, kwargs):
    model.zero_grad()
    run(x, grid, **kwargs).pooler_output.square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_one_image_training_gradients_equal_eager(attn):
    model = _tower("qwen2_vl", attn, torch.float32).train()
    x, grid, kwargs = _inputs(model, 1, torch.float32)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    assert len(_kinds(res, "rope")) == DEPTH, res.report()
    grads, eager = _grads(model, res.module, x, grid, kwargs), _grads(model, model, x, grid, kwargs)
    double = copy.deepcopy(model).double()
    ref = _grads(double, double, x.double(), grid, kwargs)
    assert set(grads) == set(eager) and "blocks.0.attn.qkv.weight" in grads
    for n in grads:
        assert_close_to_reference(grads[n], eager[n], ref[n], f"gradient of {n}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_two_images_stay_as_written_with_the_reason(dtype):
    """Each image's chunk has a length read from data (it may be 0): nothing fused that the chunks
    feed, the reason reported, the output eager's. (SDPA's path is not captured whole with two
    images: transformers branches on the chunk's length; torch.compile splits the graph there.)"""
    model = _tower("qwen2_vl", "eager", dtype)
    x, grid, kwargs = _inputs(model, 2, dtype)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    assert not _kinds(res, "rope") and not _kinds(res, "attention"), res.report()
    reasons = [m.reason for m in res.misses if m.kind == "attention"]
    assert len(reasons) == 2 * DEPTH and all("read from a tensor's values" in r for r in reasons), res.report()
    assert res.graph.code.count("aten.split_with_sizes") == 3 * DEPTH  # q, k, v of every layer, split per image
    out = res.module(x, grid, **kwargs).last_hidden_state
    eager = model(x, grid, **kwargs).last_hidden_state
    assert_close_to_reference(out, eager, _reference(model, x, grid, kwargs), "last_hidden_state")


def test_lengths_that_do_not_cover_the_image_fail_as_in_eager():
    """The rewritten graph reads the one chunk as the whole tensor; cu_seqlens whose length is not
    the image's (eager's torch.split raises) raise there too, from the kept assert."""
    model = _tower("qwen2_vl", "sdpa", torch.float32)
    x, grid, kwargs = _inputs(model, 1, torch.float32)
    res = fxfuse.rewrite(model, (x, grid), example_kwargs=kwargs)
    assert len(_kinds(res, "rope")) == DEPTH, res.report()
    short = dict(kwargs, cu_seqlens=torch.tensor([0, 10], dtype=kwargs["cu_seqlens"].dtype))
    with pytest.raises(RuntimeError, match="split"):
        model(x, grid, **short)
    with pytest.raises(RuntimeError, match="split sizes"):
        res.module(x, grid, **short)


@pytest.mark.parametrize("images", [1, 2])
def test_under_torch_compile_with_captured_scalars(images):
    """With capture_scalar_outputs Dynamo keeps ``lengths.tolist()`` in the graph: one image is one
    graph whose rotations are fused; two images break where SDPA branches on a chunk's length, and
    each piece runs (and is fused where its sizes allow) with eager's output."""
    model = _tower("qwen2_vl", "sdpa", torch.bfloat16)
    x, grid, kwargs = _inputs(model, images, torch.bfloat16)
    torch._dynamo.reset()
    backend = fxfuse.Backend()
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        out = torch.compile(model, backend=backend)(x, grid, **kwargs).last_hidden_state
        eager = model(x, grid, **kwargs).last_hidden_state
    rope = [m for m in backend.matches if m.kind == "rope"]
    if images == 1:
        assert len(backend.reports) == 1 and len(rope) == DEPTH, backend.report()
    else:
        assert not rope, backend.report()
    assert_close_to_reference(out, eager, _reference(model, x, grid, kwargs), "last_hidden_state")
