"""The Jacobi decoding loop.

Per step, for a batch of sequences each with an n-token block ``[t0, g1, ..., g_{n-1}]``
(``t0`` known-correct, the rest guesses):

1. one model forward over the block, on top of the committed KV cache (the block's K/V are
   appended in place by the attention op);
2. ``ops.verify_and_commit``: argmax, the accepted count, appending verified tokens, EOS and
   length handling, advancing ``cache_seqlens`` and shifting in the next guesses, in one op;
3. the guess strategy may rewrite the unverified tail (n-gram lookup).

The fixed point of this iteration is exactly greedy autoregressive decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from jacobi_engine import ops
from jacobi_engine.attention import jacobi_attention_enabled
from jacobi_engine.cache import JacobiCache
from jacobi_engine.guesses import GuessStrategy, make_guess_strategy
from jacobi_engine.hf_compat import eos_ids_from, inspect_model, model_device
from jacobi_engine.trajectory import SequenceTrajectory, build_trajectories, count_stationary

MODES = ("sliding", "chunked")


@dataclass
class JacobiStats:
    """What one ``generate`` call did.

    ``forward_passes`` counts model calls, prefill included. ``tokens_per_forward`` is new tokens
    divided by per-sequence forwards (each sequence's prefill plus every decode forward it was
    still running in), so plain autoregressive decoding scores exactly 1.0.
    ``accepted_histogram[k]`` counts (sequence, decode forward) pairs that verified ``k`` tokens.
    ``stationary_tokens`` counts tokens that were already correct while an earlier slot was
    still wrong and kept their value until verified (CLLM's term).
    """

    block_size: int
    mode: str
    forward_passes: int = 0
    tokens_generated: int = 0
    tokens_per_forward: float = 0.0
    accepted_histogram: list[int] = field(default_factory=list)
    stationary_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        total = self.prefill_seconds + self.decode_seconds
        return self.tokens_generated / total if total > 0 else 0.0


@dataclass
class JacobiOutput:
    """``sequences`` LongTensor [B, T], laid out exactly like ``model.generate(do_sample=False)``:
    the (left-padded) prompt followed by the generated tokens, padded after EOS, and as long as
    the longest sequence. ``stats`` is None unless ``return_stats``; ``trajectories`` (one per
    sequence) is None unless ``record_trajectory``."""

    sequences: torch.Tensor
    stats: JacobiStats | None = None
    trajectories: list[SequenceTrajectory] | None = None


def _check_int(name: str, value, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class JacobiEngine:
    """Jacobi decoding for a Hugging Face decoder-only causal LM.

    Args:
        model: a ``transformers`` causal LM whose attention goes through ``AttentionInterface``.
            It is not modified; the engine switches it to its own attention only during its calls.
        block_size: n, tokens per Jacobi block (1 = plain autoregressive decoding).
        mode: ``"sliding"`` keeps n guesses in flight, sliding past every accepted token;
            ``"chunked"`` iterates each n-token chunk to its fixed point before starting the next
            (the CLLM trajectory that consistency training uses).
        init: initial guesses: ``"random_prompt"`` (random prompt tokens, CLLM), ``"ngram"``
            (lookup in the prompt and output so far) or a :class:`GuessStrategy`.
        max_seq_len: if set, the cache is allocated once for prompts + new tokens up to this
            length and longer requests are refused; by default it is sized per request.
        seed: seeds the random initial guesses, so every call is reproducible.
        attention_backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :mod:`jacobi_engine.ops`).
        verify_backend: ``"auto"``, ``"native"`` (compiled op) or ``"torch"``.
    """

    def __init__(
        self,
        model,
        block_size: int = 16,
        mode: str = "sliding",
        init: str | GuessStrategy = "random_prompt",
        max_seq_len: int | None = None,
        seed: int = 0,
        attention_backend: str = "auto",
        verify_backend: str = "auto",
    ):
        self.info = inspect_model(model)
        _check_int("block_size", block_size, minimum=1)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_int("max_seq_len", max_seq_len, minimum=1, allow_none=True)
        if max_seq_len is not None and self.info.max_positions is not None and max_seq_len > self.info.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's {self.info.max_positions} positions")
        _check_int("seed", seed)
        if attention_backend not in ops.ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ops.ATTENTION_BACKENDS}, got {attention_backend!r}")
        if verify_backend not in ops.VERIFY_BACKENDS:
            raise ValueError(f"verify_backend must be one of {ops.VERIFY_BACKENDS}, got {verify_backend!r}")
        self.model = model
        self.block_size = block_size
        self.mode = mode
        self.guess_strategy = make_guess_strategy(init)
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.attention_backend = attention_backend
        self.verify_backend = verify_backend
        self._cache: JacobiCache | None = None

    # -- input validation ------------------------------------------------------------------
    def _validate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, streamer):
        device = model_device(self.model)
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
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
        _check_int("max_new_tokens", max_new_tokens, minimum=0)
        _check_int("pad_token_id", pad_token_id, minimum=0, allow_none=True)
        input_ids = input_ids.to(torch.long)
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.info.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {self.info.vocab_size})")

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                    f"shape {tuple(input_ids.shape)}"
                )
            if attention_mask.device != device:
                raise ValueError(f"attention_mask is on {attention_mask.device} but the model is on {device}")
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must contain only 0 and 1")
            attention_mask = attention_mask.to(torch.long)
            # Left padding only: each row is zeros then ones (what HF generate expects).
            if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
                raise ValueError("attention_mask must be left-padded: each row zeros, then ones")
        prompt_lengths = attention_mask.sum(dim=1)
        if bool((prompt_lengths == 0).any()):
            raise ValueError("attention_mask has a row with no tokens: every prompt needs at least one")
        longest = int(prompt_lengths.max())
        needed = longest + max_new_tokens
        limit = self.info.max_positions
        if limit is not None and needed > limit:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds the model's "
                f"{limit} positions"
            )
        if self.max_seq_len is not None and needed > self.max_seq_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {needed} exceeds "
                f"max_seq_len={self.max_seq_len}"
            )
        if streamer is not None:
            if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
                raise TypeError("streamer must have put() and end() methods (transformers' streamer protocol)")
            if input_ids.shape[0] != 1:
                raise ValueError("streamer only supports batch size 1")
        return input_ids, attention_mask, prompt_lengths

    # -- model plumbing ----------------------------------------------------------------------
    def _get_cache(self, batch: int, capacity: int, device: torch.device) -> JacobiCache:
        cache = self._cache
        if cache is None or cache.batch != batch or cache.capacity < capacity or cache.device != device:
            cache = JacobiCache(self.info.num_layers, batch, capacity, device)
            self._cache = cache
        cache.reset()
        return cache

    def _forward(self, cache: JacobiCache, input_ids, position_ids, logits_to_keep=None) -> torch.Tensor:
        kwargs = {self.info.cache_keyword: cache, "position_ids": position_ids, "use_cache": True}
        if logits_to_keep is not None and self.info.accepts_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        else:
            logits_to_keep = None
        output = self.model(input_ids=input_ids, **kwargs)
        return output.logits, logits_to_keep is not None

    def _positions(self, cache_seqlens: torch.Tensor, n: int) -> torch.Tensor:
        positions = cache_seqlens.to(torch.long)[:, None] + torch.arange(n, device=cache_seqlens.device)
        if self.info.max_positions is not None:
            # Slots past the model's last position can only hold tokens beyond max_new_tokens
            # (validated), which are never emitted; clamp so learned position tables don't overflow.
            positions = positions.clamp(max=self.info.max_positions - 1)
        return positions

    def _prefill(self, cache: JacobiCache, input_ids, prompt_lengths) -> torch.Tensor:
        """Runs the prompts right-aligned into the cache; returns each prompt's next-token logits."""
        batch, width = input_ids.shape
        longest = int(prompt_lengths.max())
        columns = (width - prompt_lengths)[:, None] + torch.arange(longest, device=input_ids.device)
        prompt_tokens = input_ids.gather(1, columns.clamp(max=width - 1))  # [B, longest], right-padded
        positions = torch.arange(longest, device=input_ids.device)[None].expand(batch, -1)
        last = prompt_lengths - 1
        keep = torch.unique(last)
        cache.kv_len_bound = longest
        logits, kept = self._forward(cache, prompt_tokens, positions, logits_to_keep=keep)
        rows = torch.arange(batch, device=input_ids.device)
        if kept:
            return logits[rows, torch.searchsorted(keep, last)]
        return logits[rows, last]

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer=None,
        return_stats: bool = True,
        record_trajectory: bool = False,
    ) -> JacobiOutput:
        """Greedy generation by Jacobi iteration; token-identical to ``model.generate(do_sample=False)``.

        ``input_ids`` [B, P] (or [P]) int, left-padded when ``attention_mask`` [B, P] marks padding.
        ``eos_token_id``/``pad_token_id`` default to the model's ``generation_config``; generation
        of a sequence stops after any id of the EOS list, or after ``max_new_tokens``.
        """
        input_ids, attention_mask, prompt_lengths = self._validate(
            input_ids, attention_mask, max_new_tokens, pad_token_id, streamer
        )
        generation_config = getattr(self.model, "generation_config", None)
        eos_list = eos_ids_from(eos_token_id, generation_config)
        if pad_token_id is None:
            pad_token_id = getattr(generation_config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = eos_list[0] if eos_list else 0
        device = input_ids.device
        batch, width = input_ids.shape
        n = self.block_size
        stats = JacobiStats(block_size=n, mode=self.mode) if return_stats else None
        if stats is not None:
            stats.accepted_histogram = [0] * (n + 1)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        if max_new_tokens == 0:
            if streamer is not None:
                streamer.end()
            return JacobiOutput(input_ids.clone(), stats, [] if record_trajectory else None)

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        capacity = int(prompt_lengths.max()) + max_new_tokens + n
        if self.max_seq_len is not None:
            capacity = max(capacity, self.max_seq_len + n)
        cache = self._get_cache(batch, capacity, device)
        sequences = torch.full((batch, width + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        sequences[:, :width] = input_ids
        out_tokens = sequences[:, width:]  # a view: the op writes generated tokens in place
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device)
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        guesses = self.guess_strategy
        guesses.start(sequences, width, prompt_lengths, n, generator)

        started = time.perf_counter()
        with jacobi_attention_enabled(self.model, cache, self.attention_backend):
            first_logits = self._prefill(cache, input_ids, prompt_lengths)
            cache.cache_seqlens.copy_(prompt_lengths.to(torch.int32))
            first = first_logits.argmax(dim=-1)
            out_tokens[:, 0] = first
            n_generated = torch.ones(batch, dtype=torch.int32, device=device)
            done = torch.isin(first, eos_ids) | (max_new_tokens <= 1)
            block = guesses.fill().clone()
            block[:, 0] = first
            guesses.refine(block, n_generated, ~done)
            sync()
            prefill_done = time.perf_counter()
            if streamer is not None:
                streamer.put(first.cpu())

            forwards = 1
            histogram = torch.zeros(n + 1, dtype=torch.long, device=device)
            logs: tuple[list, list, list] | None = ([], [], []) if (return_stats or record_trajectory) else None
            chunked = self.mode == "chunked"
            finished, longest_seqlen = bool(done.all()), int(prompt_lengths.max())
            while not finished:
                cache.kv_len_bound = longest_seqlen + n
                if logs is not None:
                    logs[0].append(block.clone())
                    logs[1].append(n_generated - 1)
                before = n_generated.clone()
                logits, _ = self._forward(cache, block, self._positions(cache.cache_seqlens, n))
                forwards += 1
                n_accepted = ops.verify_and_commit(
                    logits,
                    block,
                    guesses.fill(),
                    cache.cache_seqlens,
                    out_tokens,
                    n_generated,
                    done,
                    eos_ids,
                    max_new_tokens,
                    chunked,
                    backend=self.verify_backend,
                )
                guesses.refine(block, n_generated, (n_generated > before) & ~done)
                histogram += torch.bincount(n_accepted, minlength=n + 1)
                if logs is not None:
                    logs[2].append(n_accepted)
                # One host sync per step: are we done, and how far may attention read next time.
                status = torch.stack([done.all().to(torch.long), cache.cache_seqlens.max().to(torch.long)])
                if streamer is not None:
                    count_before, count_after = int(before[0]), int(n_generated[0])
                    if count_after > count_before:
                        streamer.put(out_tokens[0, count_before:count_after].cpu())
                finished_flag, longest_seqlen = status.tolist()
                finished = bool(finished_flag)
            sync()
            decode_done = time.perf_counter()
        if streamer is not None:
            streamer.end()

        lengths = n_generated.tolist()
        result = sequences[:, : width + max(lengths)].clone()
        trajectories = None
        if logs is not None:
            final_tokens = [out_tokens[row, : lengths[row]].tolist() for row in range(batch)]
            trajectories = build_trajectories(*logs, final_tokens, prompt_lengths.tolist())
        if stats is not None:
            histogram_list = histogram.tolist()
            histogram_list[0] = 0  # bincount's zeros are finished rows, not forwards
            stats.forward_passes = forwards
            stats.tokens_generated = sum(lengths)
            sequence_forwards = batch + sum(histogram_list)
            stats.tokens_per_forward = stats.tokens_generated / sequence_forwards
            stats.accepted_histogram = histogram_list
            stats.stationary_tokens = sum(count_stationary(t) for t in trajectories)
            stats.prefill_seconds = prefill_done - started
            stats.decode_seconds = decode_done - prefill_done
        return JacobiOutput(result, stats, trajectories if record_trajectory else None)


def generate(model, input_ids: torch.Tensor, **kwargs) -> JacobiOutput:
    """One-call shortcut: ``JacobiEngine(model, <engine args>).generate(input_ids, <generate args>)``."""
    engine_keys = ("block_size", "mode", "init", "max_seq_len", "seed", "attention_backend", "verify_backend")
    engine_kwargs = {key: kwargs.pop(key) for key in engine_keys if key in kwargs}
    return JacobiEngine(model, **engine_kwargs).generate(input_ids, **kwargs)
