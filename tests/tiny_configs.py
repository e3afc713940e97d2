"""Tiny random models for every entry of transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.

Each config starts from the architecture's defaults and has its sizes shrunk generically (names
below), with every attention window, chunk and sliding pattern shrunk to ``WINDOW`` tokens so
that they take effect within a short test. A few architectures need a nudge of their own
(``OVERRIDES``). Nothing here decides whether the engine supports a model: that is
``jacobi_engine.support``'s job, and the sweep (tests/test_arch_sweep.py) checks it.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
WINDOW = 8
LAYERS = 4
INIT_RANGE = 0.2

# Sizes by attribute name. Only names a config already has are set; unknown ones keep defaults.
SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "embed_dim": 64,
    "word_embed_proj_dim": 64,
    "embedding_size": 64,
    "intermediate_size": 96,
    "ffn_dim": 96,
    "n_inner": 96,
    "decoder_ffn_dim": 96,
    "encoder_ffn_dim": 96,
    "intermediate_size_mlp": 96,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "dense_intermediate_size": 96,
    "expert_ffn_hidden_size": 32,
    "ffn_hidden_size": 96,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "attention_head_dim": 16,
    "kv_channels": 16,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "num_expert_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "first_k_dense_replace": 1,
    # MLA: key head = nope + rope = 16, value head = 24, so D_k != D_v
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 24,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "index_topk": 4,
    "max_position_embeddings": 512,
    "n_positions": 512,
    "max_sequence_length": 512,
    "max_target_positions": 512,
    "sliding_window": WINDOW,
    "sliding_window_size": WINDOW,
    "attention_window_size": WINDOW,
    "attention_chunk_size": WINDOW,
    "window_size": WINDOW,
    "local_attention_window_len": WINDOW,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": VOCAB,
    "laurel_rank": 8,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "mamba_d_state": 8,
    "mamba_n_heads": 4,
    "mamba_d_head": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 16,
    "mamba_headdim": 16,
    "ssm_state_size": 8,
    "state_size": 8,
    "lru_width": 64,
    "rotary_dim": 8,
}
# Sizes some configs leave None by default and derive nothing from (the model then divides by None).
FILL_NONE = ("head_dim", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")


def _get(config, name):
    try:
        return getattr(config, name, None)
    except Exception:  # per-layer attributes (Gemma 4, dots3) raise on global access
        return None


def _set(config, name, value) -> bool:
    try:
        setattr(config, name, value)
        return True
    except (AttributeError, NotImplementedError):  # derived properties, or sizes a config refuses
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shrink(config) -> None:
    for name, value in SIZES.items():
        current = _get(config, name)
        if _is_int(current) or (current is None and name in FILL_NONE and hasattr(config, name)):
            _set(config, name, value)
    if _is_int(_get(config, "qk_rope_head_dim")):
        # MLA configs derive these from the rope/nope split; keep them consistent.
        if _get(config, "head_dim") is not None:
            _set(config, "head_dim", config.qk_rope_head_dim)
        if _is_int(_get(config, "num_key_value_heads")):  # MLA expands the latent to every head
            _set(config, "num_key_value_heads", _get(config, "num_attention_heads"))
        if _get(config, "qk_head_dim") is not None:
            _set(config, "qk_head_dim", config.qk_rope_head_dim + (_get(config, "qk_nope_head_dim") or 0))
    for name in LAYER_COUNTS:
        if _is_int(_get(config, name)):
            _set(config, name, LAYERS)
    layer_types = _get(config, "layer_types")
    if isinstance(layer_types, (list, tuple)) and layer_types:
        # Keep every kind of layer the architecture has, in its order of first appearance.
        kinds = list(dict.fromkeys(layer_types))
        if "full_attention" in kinds:  # last layer full, as most hybrid patterns end
            kinds.remove("full_attention")
            kinds.append("full_attention")
        if _set(config, "layer_types", [kinds[i % len(kinds)] for i in range(max(LAYERS, len(kinds)))]):
            for name in LAYER_COUNTS:
                if _is_int(_get(config, name)):
                    _set(config, name, len(config.layer_types))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id"):
        value = _get(config, name)
        if isinstance(value, list) or (_is_int(value) and value >= VOCAB):
            _set(config, name, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}.get(name, 1))
    if _get(config, "is_decoder") is False and not _get(config, "is_encoder_decoder"):
        _set(config, "is_decoder", True)  # BERT-style models are causal LMs only as decoders
    if _get(config, "initializer_range") is not None:
        _set(config, "initializer_range", INIT_RANGE)
    for name in ("sliding_window_pattern", "_sliding_window_pattern"):
        if _is_int(_get(config, name)):
            _set(config, name, 2)


def _num_layers(config) -> int:
    for name in LAYER_COUNTS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return LAYERS


def _gemma3n(config):
    config.num_kv_shared_layers = 2
    config.altup_num_inputs = 2
    config.intermediate_size = [96] * config.num_hidden_layers
    config.activation_sparsity_pattern = [0.0] * config.num_hidden_layers


def _llama4(config):
    config.no_rope_layers = [1, 1, 1, 0]
    config.moe_layers = [1, 3]
    config.interleave_moe_layer_step = 2
    config.layer_types = ["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"]
    config.floor_scale = 4  # temperature tuning takes effect within the test


def _lfm2(config):
    config.layer_types = ["conv", "full_attention"] * (LAYERS // 2)


OVERRIDES = {
    "lfm2": _lfm2,
    "lfm2_moe": _lfm2,
    "gemma3n": _gemma3n,
    "gemma3n_text": _gemma3n,
    "llama4": _llama4,
    "llama4_text": _llama4,
}


def build_config(model_type: str):
    """The shrunk config of ``model_type`` (the outer config for multimodal wrappers)."""
    config = CONFIG_MAPPING[model_type]()
    subconfigs = {id(config): config}
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            subconfigs[id(sub)] = sub
    for sub in subconfigs.values():
        _shrink(sub)
    fix = OVERRIDES.get(model_type)
    if fix is not None:
        fix(_text_config(config))
    return config


def _text_config(config):
    try:
        return config.get_text_config()
    except Exception:  # several text configs (MusicGen): the outer one
        return config


def build_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` in fp32, eval mode."""
    class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    model_class = getattr(transformers, class_name)
    config = build_config(model_type)
    config_class = getattr(model_class, "config_class", None)
    if config_class is not None and not isinstance(config, config_class):
        # A multimodal config mapped to its text-only causal LM (Llama 4, Qwen3.5): give the text part.
        config = _text_config(config)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class(config)
    return model.float().eval()
