"""The families benchmarks/model_sweep.py builds: each Hugging Face ``transformers`` model type with
the task head it is built with and its per-family exceptions to the generic tiny config.

A config is built with ``AutoConfig.for_model(model_type, **kwargs)`` from ``TINY`` (only the keys
that model type's default config has), every dropout and stochastic depth (BEiT's and Swin's
drop_path_rate: a training step is compared with eager's, so nothing random) set to zero, then the
family's own overrides; the model with the Auto class of its task (or MODEL_CLASSES), random
weights, no downloads."""
from __future__ import annotations

import torch

VOCAB = 96

# Generic tiny sizes under every name the configs use for them.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, max_position_embeddings=64, head_dim=8,
    n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, n_ctx=64,
    d_model=32, num_layers=2, num_heads=4, d_ff=48, d_kv=8, ffn_dim=48,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=48, decoder_ffn_dim=48, num_decoder_layers=2,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_routed_experts=4,
    shared_expert_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    image_size=32, patch_size=8, num_channels=3,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    use_cache=False, layerdrop=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
    tie_word_embeddings=False,
)

# model_type -> (task, overrides). Tasks: causal, masked, seq2seq, text (AutoModel on input_ids),
# vision (AutoModel on pixel_values), whisper (input_features + decoder_input_ids).
FAMILIES: dict[str, tuple[str, dict]] = {
    # decoders
    "llama": ("causal", {}),
    "mistral": ("causal", {"sliding_window": 6}),
    "mixtral": ("causal", {}),
    "qwen2": ("causal", {}),
    "qwen2_moe": ("causal", {"decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3": ("causal", {}),
    "qwen3_moe": ("causal", {"decoder_sparse_step": 1, "mlp_only_layers": []}),
    "gemma": ("causal", {}),
    "gemma2": ("causal", {"sliding_window": 6}),
    "gemma3_text": ("causal", {"sliding_window": 6}),
    "phi": ("causal", {"partial_rotary_factor": 0.5}),
    "phi3": ("causal", {"pad_token_id": 0}),
    "gpt2": ("causal", {}),
    "gpt_neox": ("causal", {"rotary_pct": 0.5}),
    "gptj": ("causal", {"rotary_dim": 4}),
    "gpt_bigcode": ("causal", {"multi_query": True}),
    "opt": ("causal", {"word_embed_proj_dim": 32}),
    "bloom": ("causal", {}),
    "falcon": ("causal", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "mpt": ("causal", {"attn_config": {"alibi": True}, "expansion_ratio": 2}),
    "stablelm": ("causal", {}),
    "starcoder2": ("causal", {}),
    "olmo": ("causal", {}),
    "olmo2": ("causal", {}),
    "cohere": ("causal", {}),
    "cohere2": ("causal", {"sliding_window": 6}),
    "granite": ("causal", {}),
    "deepseek_v3": ("causal", {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                               "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": 4,
                               "head_dim": 4}),  # its rotary width is head_dim (= qk_rope_head_dim)
    "codegen": ("causal", {"rotary_dim": 4}),
    "gpt_neo": ("causal", {"attention_types": [[["global", "local"], 1]], "num_layers": 2, "window_size": 6}),
    "xglm": ("causal", {}),
    "persimmon": ("causal", {}),
    "glm": ("causal", {}),
    "glm4": ("causal", {}),
    "helium": ("causal", {}),
    "smollm3": ("causal", {}),
    "olmoe": ("causal", {}),
    "granitemoe": ("causal", {}),
    "nemotron": ("causal", {}),
    "biogpt": ("causal", {}),
    "ernie4_5": ("causal", {}),
    "phimoe": ("causal", {}),
    "ministral": ("causal", {"sliding_window": 6}),
    "seed_oss": ("causal", {}),
    "apertus": ("causal", {}),
    "bitnet": ("causal", {}),
    # encoders
    "bert": ("masked", {}),
    "roberta": ("masked", {}),
    "distilbert": ("masked", {"dim": 32, "hidden_dim": 48, "n_layers": 2, "n_heads": 4}),
    "electra": ("masked", {"embedding_size": 32}),
    "albert": ("masked", {"embedding_size": 16}),
    "deberta": ("masked", {}),
    "deberta-v2": ("masked", {}),
    "xlm-roberta": ("masked", {}),
    "mpnet": ("masked", {}),
    "megatron-bert": ("masked", {}),
    "roformer": ("masked", {"embedding_size": 32}),
    "modernbert": ("masked", {"global_attn_every_n_layers": 2, "local_attention": 4}),
    "esm": ("masked", {"mask_token_id": 3}),
    # encoder-decoders
    "t5": ("seq2seq", {}),
    "mt5": ("seq2seq", {}),
    "umt5": ("seq2seq", {}),
    "bart": ("seq2seq", {}),
    "mbart": ("seq2seq", {}),
    "marian": ("seq2seq", {"decoder_vocab_size": VOCAB}),
    "pegasus": ("seq2seq", {}),
    "m2m_100": ("seq2seq", {}),
    "blenderbot": ("seq2seq", {}),
    "plbart": ("seq2seq", {}),
    "whisper": ("whisper", {"num_mel_bins": 8, "max_source_positions": 8, "max_target_positions": 32}),
    # vision and text towers
    "vit": ("vision", {}),
    "deit": ("vision", {}),
    "beit": ("vision", {"use_relative_position_bias": True}),
    "dinov2": ("vision", {}),
    "swin": ("vision", {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 2, "patch_size": 4}),
    "clip_text_model": ("text", {}),
    "siglip_text_model": ("text", {}),
    "clip_vision_model": ("vision", {}),
    "siglip_vision_model": ("vision", {}),
}

# Model types with no Auto class for their config (AutoModel has SigLIP's vision tower, not its text one).
MODEL_CLASSES = {"siglip_text_model": "SiglipTextModel"}


def build_config(model_type: str):
    import transformers

    default = transformers.AutoConfig.for_model(model_type)
    # (not the keys the config computes: Falcon's head_dim is a property)
    kwargs = {k: v for k, v in TINY.items() if hasattr(default, k) and not isinstance(getattr(type(default), k, None), property)}
    # A generic key that is another name for a key the family overrides (Swin's num_attention_heads is
    # its num_heads, a per-stage list) would be set after it and overwrite it: the family's wins.
    aliases = getattr(default, "attribute_map", {})
    kwargs = {k: v for k, v in kwargs.items() if aliases.get(k) not in FAMILIES[model_type][1]}
    for k, v in vars(default).items():
        if isinstance(v, float) and not isinstance(v, bool) and ("dropout" in k or "pdrop" in k or "drop_path" in k):
            kwargs[k] = 0.0
    kwargs.update(FAMILIES[model_type][1])
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def build_model(model_type: str, attn: str) -> torch.nn.Module:
    import transformers

    task = FAMILIES[model_type][0]
    config = build_config(model_type)
    config._attn_implementation = attn
    auto = {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM, "whisper": transformers.AutoModelForSpeechSeq2Seq,
            }.get(task, transformers.AutoModel)
    if model_type in MODEL_CLASSES:
        model = getattr(transformers, MODEL_CLASSES[model_type])._from_config(config, attn_implementation=attn)
    else:
        model = auto.from_config(config, attn_implementation=attn)
    _randomize_norm_weights(model)
    return model.eval()


def _randomize_norm_weights(model: torch.nn.Module) -> None:
    # Norm weights start at ones (or zeros for Gemma's 1 + w): random values make a weight the
    # rewrite dropped or applied twice show in the outputs and gradients.
    with torch.no_grad():
        for name, m in model.named_modules():
            if "norm" in type(m).__name__.lower() or "norm" in name.rsplit(".", 1)[-1].lower():
                for p in m.parameters(recurse=False):
                    p.normal_(0.5, 0.3)


def make_inputs(model_type: str, model: torch.nn.Module, length: int, seed: int = 1) -> dict:
    """Keyword inputs for B 2 at ``length`` tokens (patches, frames); a padding mask on the second
    sequence for the families that take one."""
    task = FAMILIES[model_type][0]
    g = torch.Generator().manual_seed(seed + length)
    cfg = model.config
    if task == "vision":
        size = getattr(cfg, "image_size", 32)
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}
    if task == "whisper":
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(2, cfg.num_mel_bins, frames, generator=g),
                "decoder_input_ids": torch.randint(3, VOCAB, (2, length), generator=g)}
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -2:] = 0  # the second sequence is right-padded
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (2, max(length // 2, 2)), generator=g)
    return out


def float_outputs(out) -> list[torch.Tensor]:
    """The floating tensors of a model's output (logits, hidden states), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in float_outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in float_outputs(o)]
    return []
