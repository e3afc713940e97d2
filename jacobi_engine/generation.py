"""generation_config parity: the settings HF ``generate`` honours, resolved once per call.

Settings are resolved like ``GenerationMixin.generate``: the model's ``generation_config``,
overridden by a ``generation_config`` argument and by keyword arguments. A setting that would
change greedy output and that the engine does not implement is refused, naming it. With
``do_sample=True`` the sampling warpers are resolved too (:class:`~jacobi_engine.sampling.SamplingSpec`,
HF's defaults for unset fields); they run after the processors, as in HF. The processors a call asks
for are its :class:`ProcessorSpec`, which :class:`jacobi_engine.processors.LogitsProcessing` applies.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from jacobi_engine.config import check_int
from jacobi_engine.sampling import SamplingSpec

# Settings that do not change greedy output (sampling warpers, output formatting, cache and
# speed options, exact acceleration methods such as prompt lookup or assisted decoding). The
# warpers the engine does not implement are refused when sampling (_UNSUPPORTED_WARPERS).
_IGNORED = {
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "top_h",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "use_cache",
    "cache_implementation",
    "cache_config",
    "return_legacy_cache",
    "return_dict_in_generate",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
    "assistant_early_exit",
    "assistant_lookbehind",
    "target_lookbehind",
    "dola_layers",
    "length_penalty",
    "early_stopping",
    "low_memory",
    "compile_config",
    "disable_compile",
    "is_assistant",
    "bos_token_id",
    "decoder_start_token_id",
    "transformers_version",
    "generation_kwargs",
    "_from_model_config",
    "_commit_hash",
    "_original_object_hash",
    "base_model_prefix",
    "trust_remote_code",
}
# Outputs HF can return beside the sequences, which the engine does not produce: refused when asked for.
_NOT_RETURNED = ("output_attentions", "output_hidden_states", "output_scores", "output_logits")
# Sampling warpers of HF that change the sampled distribution and that the engine does not implement:
# refused when sampling, with the value at which HF leaves them out.
_UNSUPPORTED_WARPERS = {
    "typical_p": lambda value: value is None or value >= 1.0,
    "epsilon_cutoff": lambda value: value is None or not 0.0 < value < 1.0,
    "eta_cutoff": lambda value: value is None or not 0.0 < value < 1.0,
    "top_h": lambda value: value is None,
}
# Settings the engine applies itself (lengths, special tokens) or through LogitsProcessing.
_HANDLED = {
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "min_length",
    "eos_token_id",
    "pad_token_id",
    "do_sample",
    *_NOT_RETURNED,
    "num_beams",
    "num_return_sequences",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "renormalize_logits",
}


@dataclass(frozen=True)
class ProcessorSpec:
    """The processors of one call (hashable: it is part of the engine's step-cache key)."""

    repetition_penalty: float | None = None
    no_repeat_ngram_size: int = 0
    bad_words: tuple[tuple[int, ...], ...] = ()
    min_length: int = 0  # absolute, like HF: eos is banned while cur_len < min_length
    min_new_tokens: int = 0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    begin_index: int = -1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    max_length: int = 0  # HF's max_length (prompt width + max_new_tokens), for forced_eos
    prompt_width: int = 0  # HF's input_ids_seq_length, for min_new_tokens
    eos_ids: tuple[int, ...] = ()
    remove_invalid_values: bool = False
    renormalize_logits: bool = False

    @property
    def active(self) -> bool:
        return any(
            (
                self.repetition_penalty is not None,
                self.no_repeat_ngram_size > 0,
                self.bad_words,
                self.min_length > 0 and self.eos_ids,
                self.min_new_tokens > 0 and self.eos_ids,
                self.suppress_tokens,
                self.begin_suppress_tokens,
                self.forced_bos_token_id is not None,
                self.forced_eos_token_id,
                self.remove_invalid_values,
                self.renormalize_logits,
            )
        )


@dataclass(frozen=True)
class GenerationSettings:
    """What one ``generate`` call does, resolved from the generation config."""

    max_new_tokens: int
    eos_ids: list[int]
    pad_token_id: int
    processors: ProcessorSpec
    sampling: SamplingSpec | None = None  # None: greedy


def _default_value(name: str):
    """HF's default of a field: what a fresh ``GenerationConfig`` holds, else (transformers >= 5.2x, where
    fresh fields are None) the global default ``generate`` fills in for an unset field."""
    from transformers import GenerationConfig

    value = getattr(GenerationConfig(), name, None)
    if value is None:
        global_defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
        value = global_defaults.get(name)
    return value


def _token_list(name: str, value, vocab_size: int) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise TypeError(f"{name} must be a list of token ids, got {value!r}")
    for token in value:
        if not 0 <= token < vocab_size:
            raise ValueError(f"{name} holds token id {token}, outside the vocabulary [0, {vocab_size})")
    return list(value)


def resolve_generation(
    model,
    generation_config,
    overrides: dict,
    *,
    prompt_width: int,
    vocab_size: int,
    max_positions: int | None,
) -> GenerationSettings:
    """Resolves one call's settings as ``model.generate`` would.

    ``generation_config`` (a ``transformers.GenerationConfig`` or None) replaces the model's;
    ``overrides`` are keyword arguments of ``generate`` (``max_new_tokens``, ``eos_token_id``,
    ``repetition_penalty``, ...; None values mean "not given"). Raises TypeError for an unknown
    keyword and ValueError for a setting the engine cannot honour, naming it.
    """
    from transformers import GenerationConfig

    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if base is not None and not isinstance(base, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig, got {type(base).__name__}")
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    given = {key: value for key, value in overrides.items() if value is not None}
    for key, value in given.items():
        if not hasattr(config, key) and key not in _HANDLED:
            raise TypeError(f"generate() got an unexpected keyword argument {key!r}")
        setattr(config, key, value)

    for key in _NOT_RETURNED:
        if getattr(config, key, False):
            raise ValueError(
                f"{key}=True: jacobi_engine returns sequences only, not per-position {key.removeprefix('output_')} "
                "(a Jacobi step scores a whole block of guesses at once); unset it"
            )
    # Anything else that is set and would change greedy output is refused by name.
    for key, value in sorted(config.to_dict().items()):
        if key in _IGNORED or key in _HANDLED or value is None or key.startswith("_"):
            continue  # (underscored fields are HF's own state of a prepared config: its token tensors)
        default = _default_value(key)
        if value == default or (value in ((), [], {}) and not default):
            continue
        raise ValueError(
            f"generation_config.{key}={value!r} changes the generated tokens and is not supported by jacobi_engine "
            f"(it would not reproduce model.generate); unset it or pass {key}=None"
        )
    sampling = _resolve_sampling(config) if config.do_sample else None
    if (config.num_beams or 1) != 1:
        raise ValueError(f"num_beams={config.num_beams}: beam search is not supported, use num_beams=1")
    if (config.num_return_sequences or 1) != 1:
        raise ValueError(
            f"num_return_sequences={config.num_return_sequences}: the engine returns one sequence per prompt (to draw "
            "several samples of a prompt, repeat it in the batch: rows sample independently)"
        )

    # Lengths, as GenerationMixin._prepare_generated_length does.
    max_new_tokens = config.max_new_tokens
    default_max_length = _default_value("max_length")
    max_length_given = "max_length" in given or (
        config.max_length is not None and config.max_length != default_max_length
    )
    if max_new_tokens is None:
        if max_length_given:
            check_int("max_length", config.max_length, minimum=1)
            max_new_tokens = config.max_length - prompt_width
            if max_new_tokens <= 0:
                raise ValueError(
                    f"max_length={config.max_length} leaves no room for new tokens after a prompt of width "
                    f"{prompt_width}; set max_new_tokens instead"
                )
        else:  # HF's default: 20 new tokens, capped at the model's positions
            max_length = (default_max_length or 20) + prompt_width
            if max_positions is not None:
                max_length = min(max_length, max_positions)
            max_new_tokens = max(max_length - prompt_width, 0)
    check_int("max_new_tokens", max_new_tokens, minimum=0)

    eos = config.eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    eos_ids = [] if eos is None else _token_list("eos_token_id", eos, 2**62)
    pad = config.pad_token_id
    if isinstance(pad, torch.Tensor):
        pad = int(pad)
    if pad is not None:
        check_int("pad_token_id", pad, minimum=0)

    min_new = config.min_new_tokens or 0
    check_int("min_new_tokens", min_new, minimum=0)
    min_length = config.min_length or 0
    check_int("min_length", min_length, minimum=0)
    if min_new > 0:
        min_length = min_new + prompt_width  # HF replaces min_length when min_new_tokens is set
    penalty = config.repetition_penalty
    if penalty is not None:
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a strictly positive float, got {penalty!r}")
        penalty = None if float(penalty) == 1.0 else float(penalty)
    ngram = config.no_repeat_ngram_size or 0
    check_int("no_repeat_ngram_size", ngram, minimum=0)
    bad_words: list[tuple[int, ...]] = []
    if config.bad_words_ids is not None:
        if not isinstance(config.bad_words_ids, list) or not config.bad_words_ids:
            raise ValueError(
                f"bad_words_ids must be a non-empty list of lists of token ids, got {config.bad_words_ids!r}"
            )
        for word in config.bad_words_ids:
            word = _token_list("bad_words_ids", word, vocab_size)
            if not word:
                raise ValueError("bad_words_ids holds an empty sequence")
            if len(word) == 1 and word[0] in eos_ids:
                continue  # HF's NoBadWordsLogitsProcessor never bans an EOS token on its own
            bad_words.append(tuple(word))
    suppress = tuple(_token_list("suppress_tokens", config.suppress_tokens or [], vocab_size))
    begin_suppress = tuple(_token_list("begin_suppress_tokens", config.begin_suppress_tokens or [], vocab_size))
    forced_bos = config.forced_bos_token_id
    if forced_bos is not None:
        forced_bos = _token_list("forced_bos_token_id", forced_bos, vocab_size)[0]
    forced_eos = config.forced_eos_token_id
    forced_eos = () if forced_eos is None else tuple(_token_list("forced_eos_token_id", forced_eos, vocab_size))
    begin_index = prompt_width if (prompt_width > 1 or forced_bos is None) else prompt_width + 1
    spec = ProcessorSpec(
        repetition_penalty=penalty,
        no_repeat_ngram_size=ngram,
        bad_words=tuple(bad_words),
        min_length=min_length if eos_ids else 0,
        min_new_tokens=min_new if eos_ids else 0,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
        begin_index=begin_index if begin_suppress else -1,
        forced_bos_token_id=forced_bos,
        forced_eos_token_id=forced_eos,
        max_length=prompt_width + max_new_tokens if forced_eos else 0,
        prompt_width=prompt_width if min_new > 0 and eos_ids else 0,
        eos_ids=tuple(eos_ids),
        remove_invalid_values=bool(config.remove_invalid_values),
        renormalize_logits=bool(config.renormalize_logits),
    )
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return GenerationSettings(
        max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_token_id=pad, processors=spec, sampling=sampling
    )


def _resolve_sampling(config) -> SamplingSpec:
    """The warpers of a ``do_sample=True`` call, with HF's global defaults for unset fields
    (``GenerationConfig._get_default_generation_params``: temperature 1.0, top_k 50, top_p 1.0)."""
    if not isinstance(config.do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(config.do_sample).__name__}")
    for name, left_out in _UNSUPPORTED_WARPERS.items():
        value = getattr(config, name, None)
        if not left_out(value):
            raise ValueError(
                f"{name}={value!r} is not supported by jacobi_engine's sampling (temperature, top_k, top_p and min_p "
                f"are); unset it or pass {name}=None"
            )
    temperature = 1.0 if config.temperature is None else config.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a float > 0 when sampling, got {temperature!r}")
    top_k = 50 if config.top_k is None else config.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    top_p = 1.0 if config.top_p is None else config.top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
    min_p = config.min_p
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be a float in [0, 1] or None, got {min_p!r}")
    return SamplingSpec(
        temperature=float(temperature),
        top_k=top_k,
        top_p=float(top_p),
        min_p=None if min_p is None else float(min_p),
    )
