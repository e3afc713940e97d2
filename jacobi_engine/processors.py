"""generation_config parity: the settings HF ``generate`` honours, resolved once per call, and the
logits processors that change greedy output, applied to every block slot with its own prefix.

HF applies its processors to the next-token scores of one position, given ``input_ids``: the
prompt exactly as passed (left padding included) followed by the tokens generated so far. In a
Jacobi block, slot ``j`` predicts the token after ``[prompt, generated, block[1..j]]``, so each
slot is processed as HF would process that position: its own ``cur_len`` and its own prefix.
The fixed point of the iteration is then HF's greedy output *with* the processors.

Everything runs as tensor ops on the device with static shapes (no host sync), so a processed
step can still be captured in a CUDA graph. Each processor mirrors the arithmetic of its HF
counterpart (same comparisons, same ``where``/``+``), so ties and NaNs resolve the same way.

Settings are resolved like ``GenerationMixin.generate``: the model's ``generation_config``,
overridden by a ``generation_config`` argument and by keyword arguments. A setting that would
change greedy output and that the engine does not implement is refused, naming it. With
``do_sample=True`` the sampling warpers are resolved too (:class:`~jacobi_engine.sampling.SamplingSpec`,
HF's defaults for unset fields); they run after these processors, as in HF.
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


class LogitsProcessing:
    """Applies a :class:`ProcessorSpec` to block scores, each slot with its own prefix.

    ``apply(scores, history, cur_len, pad_lengths)``:

    * ``scores`` float [B, m, V]: slot ``j`` scores the token after the first ``cur_len[b, j]``
      tokens of ``history[b]``;
    * ``history`` int64 [B, W]: HF's ``input_ids`` view, i.e. the prompt as passed (padding
      included) then every token fed so far, the block's guesses included;
    * ``cur_len`` int64 [B, m]: HF's ``input_ids.shape[-1]`` at each slot;
    * ``pad_lengths`` int64 [B]: leading padding of each prompt (HF's ``prompt_ignore_length``
      for the repetition penalty).

    Returns new scores [B, m, V] (the input is not modified).
    """

    def __init__(self, spec: ProcessorSpec, vocab_size: int, device: torch.device):
        self.spec = spec
        self.vocab_size = vocab_size
        self.device = device
        vocab = torch.arange(vocab_size, device=device)

        def token_mask(ids) -> torch.Tensor | None:
            if not ids:
                return None
            return torch.isin(vocab, torch.tensor(list(ids), dtype=torch.long, device=device))

        self.eos_mask = token_mask(spec.eos_ids)
        self.suppress_mask = token_mask(spec.suppress_tokens)
        self.begin_suppress_mask = token_mask(spec.begin_suppress_tokens)
        self.forced_eos_mask = token_mask(spec.forced_eos_token_id)
        single = [word[0] for word in spec.bad_words if len(word) == 1]
        self.single_bad_mask = token_mask(single)
        self.multi_bad = [
            (torch.tensor(word[:-1], dtype=torch.long, device=device), word[-1])
            for word in spec.bad_words
            if len(word) > 1
        ]

    def apply(
        self, scores: torch.Tensor, history: torch.Tensor, cur_len: torch.Tensor, pad_lengths: torch.Tensor
    ) -> torch.Tensor:
        spec = self.spec
        inf = float("inf")
        if spec.repetition_penalty is not None:
            present = self._present_tokens(history, cur_len, pad_lengths, scores.shape[-1])
            penalty = spec.repetition_penalty
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(present, penalised, scores)
        if spec.no_repeat_ngram_size > 0:
            banned = self._banned_ngram_tokens(history, cur_len, spec.no_repeat_ngram_size, scores.shape[-1])
            scores = scores.masked_fill(banned, -inf)
        if spec.bad_words:
            scores = scores + self._bad_words_bias(history, cur_len, scores)
        if self.eos_mask is not None and spec.min_length > 0:
            short = (cur_len < spec.min_length)[..., None]
            scores = torch.where(short & self.eos_mask, -inf, scores)
        if self.eos_mask is not None and spec.min_new_tokens > 0:
            short = (cur_len - spec.prompt_width < spec.min_new_tokens)[..., None]
            scores = torch.where(short & self.eos_mask, -inf, scores)
        if spec.forced_bos_token_id is not None:
            forced = torch.full_like(scores[:1, :1], -inf)
            forced[..., spec.forced_bos_token_id] = 0
            scores = torch.where((cur_len == 1)[..., None], forced, scores)
        if self.forced_eos_mask is not None:
            forced = torch.where(self.forced_eos_mask, 0.0, -inf).to(scores.dtype)
            scores = torch.where((cur_len == spec.max_length - 1)[..., None], forced, scores)
        if spec.remove_invalid_values:
            finfo = torch.finfo(scores.dtype)
            cleaned = torch.where(scores != scores, 0.0, scores)
            cleaned = torch.where(scores == inf, finfo.max, cleaned)
            scores = torch.where(scores == -inf, finfo.min, cleaned)
        if self.suppress_mask is not None:
            scores = torch.where(self.suppress_mask, -inf, scores)
        if self.begin_suppress_mask is not None:
            at_begin = (cur_len == spec.begin_index)[..., None]
            scores = torch.where(at_begin & self.begin_suppress_mask, -inf, scores)
        if spec.renormalize_logits:
            scores = scores.log_softmax(dim=-1)
        return scores

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _prefix_columns(history: torch.Tensor, cur_len: torch.Tensor) -> torch.Tensor:
        """bool [B, m, W]: column k of history lies in slot j's prefix (k < cur_len[b, j])."""
        columns = torch.arange(history.shape[1], device=history.device)
        return columns[None, None, :] < cur_len[..., None]

    def _present_tokens(self, history, cur_len, pad_lengths, vocab) -> torch.Tensor:
        """bool [B, m, V]: the token occurs in slot j's prefix past the leading padding."""
        columns = torch.arange(history.shape[1], device=history.device)
        inside = self._prefix_columns(history, cur_len) & (columns[None, None, :] >= pad_lengths[:, None, None])
        # Columns outside the prefix point at a spare column V, dropped afterwards (as HF does).
        index = torch.where(inside, history[:, None, :], vocab)
        present = torch.zeros((*cur_len.shape, vocab + 1), dtype=torch.bool, device=history.device)
        present.scatter_(2, index, True)
        return present[..., :vocab]

    def _banned_ngram_tokens(self, history, cur_len, size, vocab) -> torch.Tensor:
        """bool [B, m, V]: tokens that would repeat an n-gram of slot j's prefix (HF's NoRepeatNGram)."""
        batch, width = history.shape
        banned = torch.zeros((*cur_len.shape, vocab + 1), dtype=torch.bool, device=history.device)
        if width < size:
            return banned[..., :vocab]
        windows = history.unfold(1, size, 1)  # [B, W - size + 1, size]
        starts = torch.arange(windows.shape[1], device=history.device)
        # The last size-1 tokens of each slot's prefix.
        offsets = torch.arange(1 - size, 0, device=history.device)
        suffix_columns = (cur_len[..., None] + offsets).clamp(min=0)  # [B, m, size-1]
        suffix = history.gather(1, suffix_columns.reshape(batch, -1)).reshape(*cur_len.shape, size - 1)
        matches = (windows[:, None, :, : size - 1] == suffix[:, :, None, :]).all(dim=-1)  # [B, m, starts]
        complete = starts[None, None, :] + size <= cur_len[..., None]  # the n-gram lies inside the prefix
        hit = matches & complete & (cur_len[..., None] >= size)
        index = torch.where(hit, windows[:, None, :, size - 1], vocab)
        banned.scatter_(2, index, True)
        return banned[..., :vocab]

    def _bad_words_bias(self, history, cur_len, scores) -> torch.Tensor:
        """float [B, m, V] of 0 and -inf, HF's SequenceBias arithmetic for bad_words_ids."""
        bias = torch.zeros_like(scores)
        if self.single_bad_mask is not None:
            bias = bias + torch.where(self.single_bad_mask, -math.inf, 0.0).to(scores.dtype)
        for prefix, last in self.multi_bad:
            k = prefix.numel()
            offsets = torch.arange(-k, 0, device=history.device)
            columns = (cur_len[..., None] + offsets).clamp(min=0)  # [B, m, k]
            tail = history.gather(1, columns.reshape(history.shape[0], -1)).reshape(*cur_len.shape, k)
            match = (tail == prefix).all(dim=-1) & (cur_len >= k)
            bias[..., last] = bias[..., last] + torch.where(match, -math.inf, 0.0).to(scores.dtype)
        return bias
