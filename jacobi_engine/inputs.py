"""A ``generate`` request and its checks: token ids, the attention mask, lengths, settings, streamer.

:func:`make_request` turns the arguments of ``generate`` into a :class:`Request`, resolving the
generation settings as ``model.generate`` does (:func:`jacobi_engine.generation.resolve_generation`),
or raises a ValueError/TypeError naming the bad argument. The engine's settings are checked against the
model (:func:`check_engine_settings`) and each request against the engine's settings
(:func:`check_engine_request`) here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jacobi_engine import ops
from jacobi_engine.config import EngineConfig, check_int
from jacobi_engine.generation import GenerationSettings, resolve_generation
from jacobi_engine.hf_compat import ModelInfo
from jacobi_engine.prefill import Prompts


@dataclass(frozen=True)
class ModelLimits:
    """What about the model bounds a request (from :func:`jacobi_engine.hf_compat.inspect_model`)."""

    info: ModelInfo
    device: torch.device
    rope_switches: list  # (rope_type, switch length) of length-dependent RoPE
    windowed_attention: bool
    max_seq_len: int | None  # the engine's fixed cache size, if any


@dataclass(frozen=True)
class Request:
    prompts: Prompts
    settings: GenerationSettings
    streamer: object | None
    return_stats: bool
    record_trajectory: bool

    @property
    def batch(self) -> int:
        return self.prompts.input_ids.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.settings.max_new_tokens

    @property
    def needed_rows(self) -> int:
        """Cache rows (and token columns) for prompts and new tokens."""
        return max(self.prompts.longest, self.prompts.width) + self.max_new_tokens


def check_engine_settings(config: EngineConfig, limits: ModelLimits) -> None:
    """Refuses engine settings the model cannot serve (at ``JacobiEngine(model, ...)``), naming them."""
    max_positions = limits.info.max_positions
    if config.max_seq_len is not None and not limits.rope_switches and max_positions is not None:
        if config.max_seq_len > max_positions:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's {max_positions} positions")
    if config.cuda_graph and limits.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {limits.device}")


def check_sampling_candidates(settings: GenerationSettings, config: EngineConfig) -> None:
    limit = ops.MAX_SAMPLING_CANDIDATES
    if settings.sampling is not None and config.max_candidates > limit:
        raise ValueError(
            f"do_sample=True verifies at most {limit} candidates per step (the tree verifier's branch "
            f"limit), got candidates={config.max_candidates}"
        )


def check_engine_request(request: Request, config: EngineConfig) -> None:
    """Refuses a ``generate`` request that an engine with ``config`` cannot serve, naming the setting."""
    check_sampling_candidates(request.settings, config)
    if request.record_trajectory and config.adaptive:
        raise ValueError(
            "record_trajectory=True needs a fixed block_size and candidates (the trajectories of "
            "consistency training have one block width), not 'auto'"
        )


def position_limit(limits: ModelLimits, lengths: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """int64 [B]: the largest position worth feeding per row (prompt ``lengths`` [B]). Slots past
    max_new_tokens are never emitted; with length-dependent RoPE they must not push a forward's largest
    position past what HF's own decoding reaches, and learned position tables must stay in range."""
    limit = torch.full_like(lengths, 2**62)
    if limits.rope_switches:
        limit = (lengths + max_new_tokens - 2).clamp(min=0)
    if limits.info.max_positions is not None:
        limit = limit.clamp(max=limits.info.max_positions - 1)
    return limit


def check_input_ids(input_ids, limits: ModelLimits) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
    if input_ids.device != limits.device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {limits.device}")
    input_ids = input_ids.to(torch.long)
    low, high = int(input_ids.min()), int(input_ids.max())
    vocab = limits.info.vocab_size
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {vocab})")
    return input_ids


def check_attention_mask(input_ids, attention_mask, eos_ids, mask_pad_id, limits: ModelLimits) -> torch.Tensor:
    if attention_mask is None:
        # HF's inference: masked where input_ids == pad_token_id, if that id occurs and is no EOS.
        if mask_pad_id is not None and mask_pad_id not in eos_ids and bool((input_ids == mask_pad_id).any()):
            attention_mask = (input_ids != mask_pad_id).to(torch.long)
            source = f"attention_mask (inferred from pad_token_id={mask_pad_id}, as model.generate does)"
        else:
            return torch.ones_like(input_ids)
    else:
        source = "attention_mask"
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"shape {tuple(input_ids.shape)}"
            )
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {input_ids.device}")
        if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1")
        attention_mask = attention_mask.to(torch.long)
    if bool((attention_mask.sum(dim=1) == 0).any()):
        raise ValueError(f"{source} has a row with no tokens: every prompt needs at least one")
    # Masked tokens inside a prompt are left out (HF never attends to them and skips their
    # positions); a masked last token would make HF predict from a padding position.
    holes = (attention_mask[:, 1:] < attention_mask[:, :-1]).any()
    if limits.windowed_attention and bool(holes):
        raise ValueError(
            f"{source} masks tokens inside a prompt, and this model has sliding-window or chunked attention: "
            "HF counts masked positions inside the window, which jacobi_engine (which leaves masked tokens "
            "out) does not reproduce; left-pad the prompts instead"
        )
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            f"{source} masks the last token of a prompt (right padding): decoder-only generation "
            "needs left-padded prompts"
        )
    return attention_mask


def check_lengths(longest: int, width: int, max_new_tokens: int, limits: ModelLimits) -> None:
    needed = longest + max_new_tokens
    for rope_type, switch in limits.rope_switches:
        # HF's last forward sees positions up to longest + max_new_tokens - 2.
        if longest + max_new_tokens - 1 > switch:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} passes {switch} tokens, where this "
                f"model's rope_type {rope_type!r} switches to other frequencies mid-generation; jacobi_engine "
                f"serves {rope_type!r} RoPE models up to {switch + 1} tokens (prompt + new)"
            )
    limit = limits.info.max_positions
    if not limits.rope_switches and limit is not None and needed > limit:
        raise ValueError(
            f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
            f"{limit} positions"
        )
    if limits.max_seq_len is not None and max(needed, width + max_new_tokens) > limits.max_seq_len:
        raise ValueError(
            f"prompt length {width} + max_new_tokens {max_new_tokens} = {width + max_new_tokens} exceeds "
            f"max_seq_len={limits.max_seq_len}"
        )


def check_streamer(streamer, batch: int) -> None:
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError("streamer must have put() and end() methods (transformers' streamer protocol)")
    if batch != 1:
        raise ValueError("streamer only supports batch size 1")


def make_request(
    model,
    limits: ModelLimits,
    input_ids,
    attention_mask=None,
    *,
    generation_config=None,
    streamer=None,
    return_stats: bool = True,
    record_trajectory: bool = False,
    **overrides,
) -> Request:
    """The checked request of a ``generate`` call; ``overrides`` are generation_config fields
    (``max_new_tokens``, ``eos_token_id``, ``do_sample``, ``repetition_penalty``, ...)."""
    input_ids = check_input_ids(input_ids, limits)
    batch, width = input_ids.shape
    if not isinstance(return_stats, bool) or not isinstance(record_trajectory, bool):
        raise TypeError("return_stats and record_trajectory must be bools")
    do_sample = overrides.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool or None, got {type(do_sample).__name__}")
    for name in ("max_new_tokens", "pad_token_id"):
        check_int(name, overrides.get(name), minimum=0, allow_none=True)
    settings = resolve_generation(
        model,
        generation_config,
        overrides,
        prompt_width=width,
        vocab_size=limits.info.vocab_size,
        max_positions=limits.info.max_positions,
    )
    mask_pad_id = overrides.get("pad_token_id")
    if mask_pad_id is None:
        source = generation_config if generation_config is not None else getattr(model, "generation_config", None)
        mask_pad_id = getattr(source, "pad_token_id", None)
    attention_mask = check_attention_mask(input_ids, attention_mask, settings.eos_ids, mask_pad_id, limits)
    lengths = attention_mask.sum(dim=1)
    longest = int(lengths.max())
    check_lengths(longest, width, settings.max_new_tokens, limits)
    check_streamer(streamer, batch)
    prompts = Prompts(input_ids, attention_mask, lengths, width, longest)
    return Request(prompts, settings, streamer, return_stats, record_trajectory)
