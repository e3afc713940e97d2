"""What the engine needs to know about a Hugging Face causal LM, across transformers versions.

transformers renamed the cache keyword from ``past_key_values`` to ``cache`` in 5.24; models
differ in whether they accept ``logits_to_keep`` and in how they bound positions. This module
answers those questions once per model so the decoding loop stays version-agnostic.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from jacobi_engine.support import check_supported  # support imports the engine's modules only when it probes

try:  # transformers is a hard dependency, but keep the error readable
    from transformers import PreTrainedModel
except ImportError as error:  # pragma: no cover
    raise ImportError("jacobi_engine needs transformers>=5.17") from error


@dataclass(frozen=True)
class ModelInfo:
    cache_keyword: str  # "cache" (transformers >= 5.24) or "past_key_values"
    accepts_logits_to_keep: bool
    max_positions: int | None  # learned/rotary position limit from the config, if any
    vocab_size: int  # rows of the input embedding
    num_layers: int


def check_single_device(model: torch.nn.Module) -> None:
    """Refuse a model that accelerate split across devices (``device_map`` pipeline placement).

    The engine keeps one KV cache and runs its verify op on one device; a model whose layers sit
    on different devices would need both on every one of them. Offloading to ``"cpu"``/``"disk"``
    is fine: accelerate's hooks bring those weights to the one execution device for each forward.
    Tensor parallelism (``tp_plan``) shards within every layer and is supported.
    """
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return
    offload = {"cpu", "disk", "meta"}
    devices = {_device_name(device) for device in device_map.values()}
    compute = devices - offload or devices & {"cpu"}
    if len(compute) > 1:
        entries = [f"{name or '<root>'}: {device}" for name, device in device_map.items()]
        placement = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ValueError(
            f"model is split across devices {sorted(compute)} by device_map ({placement}); JacobiEngine needs "
            "the whole model on one device: load it with device_map='cuda:0' (or one device), or use tensor "
            "parallelism (from_pretrained(..., tp_plan='auto') under torchrun) to spread a large model over GPUs"
        )


def is_tensor_parallel(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are sharded over ranks (``tp_plan``: DTensor parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def _device_name(device) -> str:
    """accelerate's device_map values (0, "cuda:1", "cpu", "disk", torch.device) as one spelling."""
    if isinstance(device, str) and device in ("cpu", "disk", "meta"):
        return device
    device = torch.device(device)  # an int is an accelerator index, as torch.device(0) reads it
    return f"{device.type}:{device.index or 0}" if device.type != "cpu" else "cpu"


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def inspect_model(model: object) -> ModelInfo:
    """Validate that ``model`` is a decoder-only HF causal LM we can drive; describe it."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"model must be a Hugging Face transformers PreTrainedModel (a decoder-only causal LM), "
            f"got {type(model).__name__}"
        )
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model is an encoder-decoder ({type(model).__name__}); jacobi_engine supports decoder-only models"
        )
    if not model.can_generate() or model.get_output_embeddings() is None:
        raise ValueError(f"model must be a causal LM with a language-model head, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"model {type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "which jacobi_engine plugs into; use a model class that does (Llama, Qwen2, Mistral, GPT-2, ...)"
        )
    check_single_device(model)
    parameters = _forward_parameters(model)
    if "position_ids" not in parameters:
        raise ValueError(f"model {type(model).__name__}.forward does not accept position_ids")
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"
    if cache_keyword not in parameters:
        raise ValueError(f"model {type(model).__name__}.forward accepts neither `cache` nor `past_key_values`")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            max_positions = value
            break
    embeddings = model.get_input_embeddings()
    vocab_size = getattr(embeddings, "num_embeddings", None) or text_config.vocab_size
    num_layers = text_config.num_hidden_layers
    info = ModelInfo(
        cache_keyword=cache_keyword,
        accepts_logits_to_keep="logits_to_keep" in parameters,
        max_positions=max_positions,
        vocab_size=int(vocab_size),
        num_layers=int(num_layers),
    )
    check_supported(model, info)  # stateful layers, probe forward
    return info


def model_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


# RoPE types whose frequencies are picked from the largest position of each forward.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def length_dependent_rope(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(rope type, switch length) of every rotary module whose frequencies depend on the sequence length.

    Such a module changes its frequencies once ``max(position_ids) + 1`` passes the switch length:
    ``dynamic`` (NTK scaling) past ``original_max_seq_len``, ``longrope`` (Phi-3) past
    ``original_max_position_embeddings``. In HF's token-by-token decoding that maximum is the
    current length, so a request that never passes the switch length never switches.
    """
    found = []
    for module in model.modules():
        rope_types = getattr(module, "rope_type", None)
        if rope_types is None or not hasattr(module, "inv_freq") and not hasattr(module, "original_inv_freq"):
            continue
        if isinstance(rope_types, str):
            rope_types = {None: rope_types}
        if not isinstance(rope_types, dict):
            continue
        for layer_type, rope_type in rope_types.items():
            if rope_type not in LENGTH_DEPENDENT_ROPE:
                continue
            switch = None
            parameters = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
            if layer_type is not None and isinstance(parameters.get(layer_type), dict):
                parameters = parameters[layer_type]
            if rope_type == "longrope":
                switch = parameters.get("original_max_position_embeddings")
            if switch is None:
                switch = getattr(module, "original_max_seq_len", None)
            if isinstance(switch, int) and switch > 0:
                found.append((rope_type, switch))
    return found


def has_windowed_attention(model: torch.nn.Module) -> bool:
    """Whether any layer attends through a sliding window or in chunks (masks counted in token slots)."""
    for module in model.modules():
        if getattr(module, "sliding_window", None):
            return True
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        layer_types = getattr(config, "layer_types", None)
        if getattr(config, "attention_chunk_size", None):
            return True
        if layer_types:
            if any("sliding" in str(kind) or "chunk" in str(kind) for kind in layer_types):
                return True
        elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return True  # models without layer_types pass config.sliding_window to every layer (Mistral)
    return False
